/* A PHI redactor (Extism ABI, no libc).
 *
 * redact: input is a JSON record; output is the same record with the string values of
 * name-like and date-of-birth keys ("family", "given", "text", "birthDate", "value",
 * "ssn") replaced by "***", and any run of 7 or more digits
 * (phone numbers, identifiers written inline) masked with '#'. Everything else is kept
 * byte for byte. */
#include "extism.h"

#define CAP (256 * 1024)
static u8 in[CAP];
static u8 out[CAP + 1024];

static const char *KEYS[] = {"family", "given", "text", "birthDate", "value", "ssn", 0};

static int key_at(u64 i, u64 n) {
  /* in[i] == '"': is a redacted key quoted here? returns its length or 0 */
  for (int k = 0; KEYS[k]; k++) {
    u64 l = cstrlen(KEYS[k]), j = 0;
    for (; j < l && i + 1 + j < n && in[i + 1 + j] == (u8)KEYS[k][j]; j++) {
    }
    if (j == l && i + 1 + l < n && in[i + 1 + l] == '"') {
      u64 c = i + 2 + l;
      while (c < n && in[c] == ' ') c++;
      if (c < n && in[c] == ':') return (int)l; /* a key, not a value */
    }
  }
  return 0;
}

EXPORT("redact") int redact(void) {
  u64 n = read_input(in, CAP);
  if (extism_input_length() > CAP) return fail("record too large (256 KiB at most)");
  u64 o = 0, i = 0;
  while (i < n) {
    int l = in[i] == '"' ? key_at(i, n) : 0;
    if (l) {
      /* copy the key, then redact the string value(s) that follow */
      for (u64 k = 0; k < (u64)l + 2; k++) out[o++] = in[i++];
      while (i < n && (in[i] == ' ' || in[i] == ':')) out[o++] = in[i++];
      int array = i < n && in[i] == '[';
      if (array) out[o++] = in[i++];
      for (;;) {
        while (i < n && (in[i] == ' ' || in[i] == ',')) out[o++] = in[i++];
        if (i >= n || in[i] != '"') break;
        i++;
        while (i < n && in[i] != '"') i += in[i] == '\\' ? 2 : 1;
        i++;
        out[o++] = '"'; out[o++] = '*'; out[o++] = '*'; out[o++] = '*'; out[o++] = '"';
        if (!array) break;
      }
      continue;
    }
    /* a run of 7+ digits (spaces, dashes, dots and parentheses between them allowed) */
    if (in[i] >= '0' && in[i] <= '9') {
      u64 j = i, digits = 0, last = i;
      while (j < n && ((in[j] >= '0' && in[j] <= '9') || in[j] == '-' || in[j] == ' ' ||
                       in[j] == '(' || in[j] == ')' || in[j] == '.')) {
        if (in[j] >= '0' && in[j] <= '9') { digits++; last = j; }
        j++;
      }
      if (digits >= 7) {
        for (u64 k = i; k <= last; k++) out[o++] = (in[k] >= '0' && in[k] <= '9') ? '#' : in[k];
        i = last + 1;
        continue;
      }
      for (u64 k = i; k <= last; k++) out[o++] = in[k];
      i = last + 1;
      continue;
    }
    out[o++] = in[i++];
  }
  output(out, o);
  return 0;
}
