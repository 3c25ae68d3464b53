;; An Extism-ABI plugin with one export per behaviour the tests need: well-behaved
;; (echo, upper, noop, config, count, fail, rc) and misbehaving (spin, bomb, trap_on,
;; leak). Built with wasmtime.wat2wasm when the tests run.
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "input_load_u64" (func $input_load_u64 (param i64) (result i64)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "load_u8" (func $load_u8 (param i64) (result i32)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
  (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
  (import "extism:host/env" "var_get" (func $var_get (param i64) (result i64)))
  (import "extism:host/env" "var_set" (func $var_set (param i64 i64)))
  (import "extism:host/env" "log_info" (func $log_info (param i64)))
  (import "extism:host/env" "http_request" (func $http_request (param i64 i64) (result i64)))
  (import "extism:host/env" "http_status_code" (func $http_status_code (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")
  (data (i32.const 16) "plugin said no")
  (data (i32.const 32) "logged from wasm")

  ;; copy the whole input into a new block; returns its handle
  (func $input_copy (result i64)
    (local $n i64) (local $i i64) (local $out i64)
    (local.set $n (call $input_length))
    (local.set $out (call $alloc (local.get $n)))
    (block $done (loop $next
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (call $store_u8 (i64.add (local.get $out) (local.get $i))
                      (call $input_load_u8 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $next)))
    (local.get $out))

  ;; a block holding bytes [ptr, ptr+len) of this module's memory
  (func $from_mem (param $ptr i32) (param $len i32) (result i64)
    (local $h i64) (local $i i32)
    (local.set $h (call $alloc (i64.extend_i32_u (local.get $len))))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (call $store_u8 (i64.add (local.get $h) (i64.extend_i32_u (local.get $i)))
                      (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $h))

  (func (export "noop") (result i32) (i32.const 0))

  (func (export "echo") (result i32)
    (call $output_set (call $input_copy) (call $input_length))
    (i32.const 0))

  (func (export "upper") (result i32)
    (local $h i64) (local $n i64) (local $i i64) (local $c i32)
    (local.set $h (call $input_copy))
    (local.set $n (call $input_length))
    (block $done (loop $next
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (local.set $c (call $load_u8 (i64.add (local.get $h) (local.get $i))))
      (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
        (then (call $store_u8 (i64.add (local.get $h) (local.get $i))
                              (i32.sub (local.get $c) (i32.const 32)))))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $next)))
    (call $output_set (local.get $h) (local.get $n))
    (i32.const 0))

  ;; output the config value named by the input (empty when unset)
  (func (export "config") (result i32)
    (local $v i64)
    (local.set $v (call $config_get (call $input_copy)))
    (if (i64.ne (local.get $v) (i64.const 0))
      (then (call $output_set (local.get $v) (call $length (local.get $v)))))
    (i32.const 0))

  ;; a per-instance counter in the Extism var "count"; outputs its new value (1 byte)
  (func (export "count") (result i32)
    (local $v i64) (local $n i32) (local $h i64)
    (local.set $v (call $var_get (call $from_mem (i32.const 0) (i32.const 5))))
    (if (i64.ne (local.get $v) (i64.const 0))
      (then (local.set $n (call $load_u8 (local.get $v)))))
    (local.set $n (i32.add (local.get $n) (i32.const 1)))
    (local.set $h (call $alloc (i64.const 1)))
    (call $store_u8 (local.get $h) (local.get $n))
    (call $var_set (call $from_mem (i32.const 0) (i32.const 5)) (local.get $h))
    (local.set $h (call $alloc (i64.const 1)))
    (call $store_u8 (local.get $h) (i32.add (local.get $n) (i32.const 48)))
    (call $output_set (local.get $h) (i64.const 1))
    (i32.const 0))

  ;; a plugin-reported error: the plugin stays up
  (func (export "fail") (result i32)
    (call $error_set (call $from_mem (i32.const 16) (i32.const 14)))
    (i32.const 1))

  ;; a non-zero return code without a message
  (func (export "rc") (result i32) (i32.const 3))

  (func (export "log") (result i32)
    (call $log_info (call $from_mem (i32.const 32) (i32.const 16)))
    (i32.const 0))

  ;; a runaway loop
  (func (export "spin") (result i32) (loop $forever (br $forever)) (i32.const 0))

  ;; a memory bomb: grow 1 MiB at a time until refused, then abort like a PDK would
  (func (export "bomb") (result i32)
    (loop $more
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
      (br $more))
    (i32.const 0))

  ;; traps when the input starts with "boom", echoes otherwise
  (func (export "trap_on") (result i32)
    (if (i64.ge_u (call $input_length) (i64.const 4))
      (then
        (if (i64.eq (i64.and (call $input_load_u64 (i64.const 0)) (i64.const 0xFFFFFFFF))
                    (i64.const 0x6d6f6f62))  ;; "boom" little-endian
          (then unreachable))))
    (call $output_set (call $input_copy) (call $input_length))
    (i32.const 0))

  ;; a slow leak: every call keeps 256 KiB more, until the cap refuses it
  (func (export "leak") (result i32)
    (if (i32.eq (memory.grow (i32.const 4)) (i32.const -1)) (then unreachable))
    (i32.const 0))

  ;; the input is an Extism HTTP request ({"url": ...}); outputs the response body
  (func (export "fetch") (result i32)
    (local $r i64)
    (local.set $r (call $http_request (call $input_copy) (i64.const 0)))
    (if (i64.ne (local.get $r) (i64.const 0))
      (then (call $output_set (local.get $r) (call $length (local.get $r)))))
    ;; 0 for a 200, else the status code (an error)
    (if (result i32) (i32.eq (call $http_status_code) (i32.const 200))
      (then (i32.const 0)) (else (call $http_status_code))))

  ;; plain numeric exports live beside the Extism ones
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
)
