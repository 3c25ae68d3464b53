;; Reads "secret.txt" from the first preopened directory (fd 3) through WASI.
;; read() returns the number of bytes read, or -errno (e.g. -8 EBADF when no directory
;; was preopened, -44 ENOENT, -76 ENOTCAPABLE).
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "secret.txt")
  (func (export "read") (result i32)
    (local $err i32)
    ;; path_open(dirfd=3, dirflags=0, path=0, len=10, oflags=0, rights=fd_read, inherit=0,
    ;;           fdflags=0, result fd at 64)
    (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 10)
                                     (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0)
                                     (i32.const 64)))
    (if (local.get $err) (then (return (i32.sub (i32.const 0) (local.get $err)))))
    ;; one iovec at 80: buf=128, len=512; bytes read at 96
    (i32.store (i32.const 80) (i32.const 128))
    (i32.store (i32.const 84) (i32.const 512))
    (local.set $err (call $fd_read (i32.load (i32.const 64)) (i32.const 80) (i32.const 1)
                                   (i32.const 96)))
    (if (local.get $err) (then (return (i32.sub (i32.const 0) (local.get $err)))))
    (i32.load (i32.const 96)))
)
