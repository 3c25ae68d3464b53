/* The Extism plugin ABI, as the host sees it: the `extism:host/env` imports a plugin
 * may call (Trellis's own declaration; no Extism PDK needed). Handles are 64-bit
 * offsets into the host's memory; blocks are made with extism_alloc. */
#ifndef TRELLIS_EXTISM_H
#define TRELLIS_EXTISM_H

typedef unsigned long long u64;
typedef unsigned char u8;
typedef u64 handle;

#define IMPORT(name) __attribute__((import_module("extism:host/env"), import_name(name)))
#define EXPORT(name) __attribute__((export_name(name)))

IMPORT("input_length") extern u64 extism_input_length(void);
IMPORT("input_load_u8") extern u8 extism_input_load_u8(u64 offset);
IMPORT("input_load_u64") extern u64 extism_input_load_u64(u64 offset);
IMPORT("output_set") extern void extism_output_set(handle h, u64 length);
IMPORT("error_set") extern void extism_error_set(handle h);
IMPORT("alloc") extern handle extism_alloc(u64 length);
IMPORT("free") extern void extism_free(handle h);
IMPORT("length") extern u64 extism_length(handle h);
IMPORT("load_u8") extern u8 extism_load_u8(handle h);
IMPORT("load_u64") extern u64 extism_load_u64(handle h);
IMPORT("store_u8") extern void extism_store_u8(handle h, u8 value);
IMPORT("store_u64") extern void extism_store_u64(handle h, u64 value);
IMPORT("config_get") extern handle extism_config_get(handle key);
IMPORT("var_get") extern handle extism_var_get(handle key);
IMPORT("var_set") extern void extism_var_set(handle key, handle value);
IMPORT("log_info") extern void extism_log_info(handle message);
IMPORT("log_warn") extern void extism_log_warn(handle message);
IMPORT("log_error") extern void extism_log_error(handle message);

/* Helpers (static inline: each plugin is one translation unit, no libc). */

static inline u64 read_input(u8 *buf, u64 cap) {
  u64 n = extism_input_length();
  if (n > cap) n = cap;
  u64 i = 0;
  for (; i + 8 <= n; i += 8) {
    u64 w = extism_input_load_u64(i);
    for (int k = 0; k < 8; k++) buf[i + k] = (u8)(w >> (8 * k));
  }
  for (; i < n; i++) buf[i] = extism_input_load_u8(i);
  return n;
}

static inline handle to_block(const u8 *data, u64 n) {
  handle h = extism_alloc(n);
  u64 i = 0;
  for (; i + 8 <= n; i += 8) {
    u64 w = 0;
    for (int k = 0; k < 8; k++) w |= (u64)data[i + k] << (8 * k);
    extism_store_u64(h + i, w);
  }
  for (; i < n; i++) extism_store_u8(h + i, data[i]);
  return h;
}

static inline void output(const u8 *data, u64 n) { extism_output_set(to_block(data, n), n); }

static inline u64 cstrlen(const char *s) {
  u64 n = 0;
  while (s[n]) n++;
  return n;
}

static inline int fail(const char *message) {
  extism_error_set(to_block((const u8 *)message, cstrlen(message)));
  return 1;
}

#endif
