;; Trellis's Extism kernel: the memory side of the `extism:host/env` plugin ABI.
;;
;; Extism plugins exchange data with their host through blocks in a memory that is not
;; their own, addressed by 64-bit offsets ("handles"). This module owns that memory and
;; implements the ABI's memory functions in wasm, so a plugin's load/store/input calls
;; are wasm-to-wasm calls, never a trip into Python. The host links this instance under
;; `extism:host/env` beside its own functions (config, vars, log, http).
;;
;; Layout: bytes 0..31 hold the outcome of the last call for the host (`finish`); then a
;; bump allocator. Each block is an 8-byte length header followed by the data (rounded up
;; to 8 bytes); a handle is the offset of the data, never below 48. `free`
;; gives back the last block only; `reset` (before every call) frees everything. A
;; growth the store's memory cap refuses sets `oom` and traps.
(module
  (memory (export "memory") 1)
  (global $top (mut i64) (i64.const 40))
  (global $in_off (mut i64) (i64.const 0))
  (global $in_len (mut i64) (i64.const 0))
  (global $out_off (mut i64) (i64.const 0))
  (global $out_len (mut i64) (i64.const 0))
  (global $err (mut i64) (i64.const 0))
  (global $oom (mut i32) (i32.const 0))

  (func $addr (param $p i64) (result i32)
    (if (i64.ne (i64.shr_u (local.get $p) (i64.const 32)) (i64.const 0))
      (then unreachable))
    (i32.wrap_i64 (local.get $p)))

  (func $round (param $n i64) (result i64)
    (i64.and (i64.add (local.get $n) (i64.const 7)) (i64.const -8)))

  (func $alloc (export "alloc") (param $n i64) (result i64)
    (local $off i64) (local $end i64) (local $have i64) (local $pages i64)
    (if (i64.ge_u (local.get $n) (i64.const 0xFFFF0000))
      (then (global.set $oom (i32.const 1)) unreachable))
    (local.set $off (i64.add (global.get $top) (i64.const 8)))
    (local.set $end (i64.add (local.get $off) (call $round (local.get $n))))
    (local.set $have (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
    (if (i64.gt_u (local.get $end) (local.get $have))
      (then
        (local.set $pages
          (i64.shr_u (i64.add (i64.sub (local.get $end) (local.get $have)) (i64.const 65535))
                     (i64.const 16)))
        (if (i64.gt_u (local.get $pages) (i64.const 65536))
          (then (global.set $oom (i32.const 1)) unreachable))
        (if (i32.eq (memory.grow (i32.wrap_i64 (local.get $pages))) (i32.const -1))
          (then (global.set $oom (i32.const 1)) unreachable))))
    (i64.store (call $addr (global.get $top)) (local.get $n))
    (global.set $top (local.get $end))
    (local.get $off))

  (func $valid (param $p i64) (result i32)
    (i32.and (i64.ge_u (local.get $p) (i64.const 48))
             (i64.le_u (local.get $p) (global.get $top))))

  (func $length (export "length") (param $p i64) (result i64)
    (if (i32.eqz (call $valid (local.get $p))) (then (return (i64.const 0))))
    (i64.load (call $addr (i64.sub (local.get $p) (i64.const 8)))))

  (func (export "length_unsafe") (param $p i64) (result i64)
    (call $length (local.get $p)))

  (func (export "free") (param $p i64)
    (if (i32.eqz (call $valid (local.get $p))) (then return))
    (if (i64.eq (local.get $p) (global.get $in_off)) (then return))
    (if (i64.eq (i64.add (local.get $p) (call $round (call $length (local.get $p))))
                (global.get $top))
      (then (global.set $top (i64.sub (local.get $p) (i64.const 8))))))

  (func (export "load_u8") (param $p i64) (result i32)
    (i32.load8_u (call $addr (local.get $p))))
  (func (export "load_u64") (param $p i64) (result i64)
    (i64.load (call $addr (local.get $p))))
  (func (export "store_u8") (param $p i64) (param $v i32)
    (i32.store8 (call $addr (local.get $p)) (local.get $v)))
  (func (export "store_u64") (param $p i64) (param $v i64)
    (i64.store (call $addr (local.get $p)) (local.get $v)))

  (func (export "input_length") (result i64) (global.get $in_len))
  (func (export "input_offset") (result i64) (global.get $in_off))
  (func (export "input_load_u8") (param $i i64) (result i32)
    (i32.load8_u (call $addr (i64.add (global.get $in_off) (local.get $i)))))
  (func (export "input_load_u64") (param $i i64) (result i64)
    (i64.load (call $addr (i64.add (global.get $in_off) (local.get $i)))))
  (func (export "input_set") (param $p i64) (param $n i64)
    (global.set $in_off (local.get $p)) (global.set $in_len (local.get $n)))

  (func (export "output_set") (param $p i64) (param $n i64)
    (global.set $out_off (local.get $p)) (global.set $out_len (local.get $n)))
  (func (export "output_length") (result i64) (global.get $out_len))
  (func (export "output_offset") (result i64) (global.get $out_off))

  (func (export "error_set") (param $p i64) (global.set $err (local.get $p)))
  (func (export "error_get") (result i64) (global.get $err))

  (func (export "memory_bytes") (result i64)
    (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
  (func (export "oom") (result i32) (global.get $oom))

  ;; the host's side of a call, in one export each way: before, reset and copy-in space
  ;; for `n` input bytes (returns its handle); after, the outcome at bytes 0..31
  ;; (output handle, output length, error handle, error length)
  (func (export "prepare") (param $n i64) (result i64)
    (local $off i64)
    (call $reset)
    (local.set $off (call $alloc (local.get $n)))
    (global.set $in_off (local.get $off))
    (global.set $in_len (local.get $n))
    (local.get $off))
  (func (export "finish")
    (i64.store (i32.const 0) (global.get $out_off))
    (i64.store (i32.const 8) (global.get $out_len))
    (i64.store (i32.const 16) (global.get $err))
    (i64.store (i32.const 24) (call $length (global.get $err))))

  (func $reset (export "reset")
    (global.set $top (i64.const 40))
    (global.set $in_off (i64.const 0)) (global.set $in_len (i64.const 0))
    (global.set $out_off (i64.const 0)) (global.set $out_len (i64.const 0))
    (global.set $err (i64.const 0)) (global.set $oom (i32.const 0)))
)
