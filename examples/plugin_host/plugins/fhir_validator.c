/* A FHIR-style Patient record validator (Extism ABI, no libc).
 *
 * validate: input is a JSON Patient resource; output is {"valid":true} or
 * {"valid":false,"errors":["..."]}. Checks: resourceType is Patient; id, name and
 * birthDate present; birthDate is YYYY-MM-DD with a sane month and day, not before
 * 1900 and not after the configured "max_year" (default 2026); gender, when present,
 * is one of the FHIR administrative genders; every "system" is a known code system
 * (identifier systems, or a telecom's phone/email). A structural search, not a full JSON parser: records are small. */
#include "extism.h"

#define CAP (256 * 1024)
static u8 in[CAP];
static u8 out[4096];
static u64 n_in, n_out;
static int n_err;

static int match(u64 at, const char *s) {
  u64 k = 0;
  for (; s[k]; k++)
    if (at + k >= n_in || in[at + k] != (u8)s[k]) return 0;
  return 1;
}

/* offset of the string value of "key" (just after its opening quote), or -1 */
static long long find_value(const char *key) {
  u64 kl = cstrlen(key);
  for (u64 i = 0; i + kl + 2 < n_in; i++) {
    if (in[i] == '"' && match(i + 1, key) && in[i + 1 + kl] == '"') {
      u64 j = i + 2 + kl;
      while (j < n_in && (in[j] == ' ' || in[j] == ':' || in[j] == '\n' || in[j] == '\t')) j++;
      if (j < n_in && in[j] == '"') return (long long)(j + 1);
      if (j < n_in && (in[j] == '[' || in[j] == '{')) return (long long)j;
      return -2; /* present but not a string */
    }
  }
  return -1;
}

static void emit(const char *s) {
  for (u64 k = 0; s[k] && n_out < sizeof(out) - 4; k++) out[n_out++] = (u8)s[k];
}

static void error(const char *message) {
  emit(n_err++ ? ",\"" : "\"");
  emit(message);
  emit("\"");
}

static int digits(u64 at, int count, int *value) {
  int v = 0;
  for (int k = 0; k < count; k++) {
    if (at + k >= n_in || in[at + k] < '0' || in[at + k] > '9') return 0;
    v = v * 10 + (in[at + k] - '0');
  }
  *value = v;
  return 1;
}

static int max_year(void) {
  static const char key[] = "max_year";
  handle v = extism_config_get(to_block((const u8 *)key, sizeof(key) - 1));
  if (!v) return 2026;
  int y = 0;
  u64 len = extism_length(v);
  for (u64 k = 0; k < len; k++) {
    u8 c = extism_load_u8(v + k);
    if (c < '0' || c > '9') return 2026;
    y = y * 10 + (c - '0');
  }
  return y;
}

EXPORT("validate") int validate(void) {
  n_in = read_input(in, CAP);
  n_out = 0;
  n_err = 0;
  emit("{\"valid\":");
  u64 header = n_out;
  emit("false,\"errors\":[");

  long long rt = find_value("resourceType");
  if (rt < 0 || !match((u64)rt, "Patient\"")) error("resourceType must be Patient");
  if (find_value("id") < 0) error("missing id");
  if (find_value("name") == -1) error("missing name");

  long long bd = find_value("birthDate");
  if (bd < 0) {
    error("missing birthDate");
  } else {
    int y, m, d;
    u64 b = (u64)bd;
    if (!digits(b, 4, &y) || in[b + 4] != '-' || !digits(b + 5, 2, &m) || in[b + 7] != '-' ||
        !digits(b + 8, 2, &d) || in[b + 10] != '"')
      error("birthDate is not YYYY-MM-DD");
    else if (m < 1 || m > 12 || d < 1 || d > 31 || (m == 2 && d > 29) ||
             ((m == 4 || m == 6 || m == 9 || m == 11) && d > 30))
      error("birthDate is not a calendar date");
    else if (y < 1900 || y > max_year())
      error("birthDate is out of range");
  }

  long long g = find_value("gender");
  if (g >= 0 && !(match((u64)g, "male\"") || match((u64)g, "female\"") ||
                  match((u64)g, "other\"") || match((u64)g, "unknown\"")))
    error("gender is not a FHIR administrative gender");

  /* every "system": "..." must be a known code system */
  for (u64 i = 0; i + 9 < n_in; i++) {
    if (match(i, "\"system\"")) {
      u64 j = i + 8;
      while (j < n_in && (in[j] == ' ' || in[j] == ':')) j++;
      if (j < n_in && in[j] == '"') {
        j++;
        if (!(match(j, "http://hl7.org/fhir/sid/us-ssn\"") ||
              match(j, "http://hl7.org/fhir/sid/us-npi\"") ||
              match(j, "http://terminology.hl7.org/CodeSystem/v2-0203\"") ||
              match(j, "urn:oid:") || match(j, "phone\"") || match(j, "email\"")))
          error("identifier system is not a known code system");
      }
    }
  }

  if (n_err == 0) {
    n_out = header;
    emit("true}");
  } else {
    emit("]}");
  }
  output(out, n_out);
  return 0;
}
