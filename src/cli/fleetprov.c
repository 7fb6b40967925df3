/* fleetprov: the command-line front end of the library, for init scripts and systemd units.
 *
 *   fleetprov provision --endpoint HOST --cert CLAIM.pem --key CLAIM.key --template NAME
 *                       --out DIR [options]
 *   fleetprov rotate    --endpoint HOST --template NAME --out DIR [options]
 *   fleetprov --version | help
 *
 * A small C11 + POSIX program on the public C API only (include/fleetprov.h): options from the
 * command line and/or a `key = value` file, the one-call flow (fleetprov_provision) or the
 * rotation (fleetprov_rotate), progress on stderr, the outcome on stdout (key=value lines, or
 * one JSON object with --json), and an exit status by class of error (see usage() and
 * exit_status()). SIGINT and SIGTERM trigger the library's async-signal-safe cancellation
 * switch: the flow stops at its next step keeping its resume journal, and the program exits
 * with 130 or 143. Private keys and ownership tokens are never printed: the program never reads
 * them (the library writes the key file itself), and the library's messages never hold them.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fleetprov.h"

/* Exit statuses, sysexits(3) values (the header is not POSIX, so they are spelled here). */
#define EXIT_USAGE 64       /* EX_USAGE: bad command line or configuration file */
#define EXIT_DATAERR 65     /* EX_DATAERR: an input file is unusable (bad PEM, mismatched key) */
#define EXIT_NOINPUT 66     /* EX_NOINPUT: an input file cannot be read */
#define EXIT_UNAVAILABLE 69 /* EX_UNAVAILABLE: the endpoint cannot be reached */
#define EXIT_SOFTWARE 70    /* EX_SOFTWARE: internal error, ABI mismatch */
#define EXIT_CANTCREAT 73   /* EX_CANTCREAT: the credentials or the journal cannot be written */
#define EXIT_TEMPFAIL 75    /* EX_TEMPFAIL: timeout, throttled, busy: try again later */
#define EXIT_PROTOCOL 76    /* EX_PROTOCOL: the service answered something unusable */
#define EXIT_NOPERM 77      /* EX_NOPERM: refused by the service or in the TLS handshake */
#define EXIT_SIGINT 130     /* 128 + SIGINT */
#define EXIT_SIGTERM 143    /* 128 + SIGTERM */

#define PROG "fleetprov"
#define MAX_PARAMS 32

enum command { CMD_PROVISION = 1, CMD_ROTATE = 2 };
#define CMD_BOTH (CMD_PROVISION | CMD_ROTATE)

/* Every setting, by the name it has as a long flag (--name) and as a configuration file key. */
enum key {
    K_ENDPOINT,
    K_PORT,
    K_CA,
    K_CERT,
    K_KEY,
    K_TEMPLATE,
    K_PARAM,
    K_OUT,
    K_CREDENTIALS,
    K_STATE_DIR,
    K_FORMAT,
    K_METHOD,
    K_KEY_TYPE,
    K_TIMEOUT,
    K_DEADLINE,
    K_RETRY,
    K_CLIENT_ID,
    K_REPROVISION,
    K_JSON,
    K_QUIET,
    K_VERBOSE,
    K_CONFIG,
    K_COUNT
};

struct key_def {
    const char *name;
    int is_switch;   /* a flag without value on the command line; yes/no in the file */
    unsigned cmds;   /* the commands it applies to */
    int in_file;     /* may appear in a configuration file */
};

static const struct key_def KEYS[K_COUNT] = {
    [K_ENDPOINT] = {"endpoint", 0, CMD_BOTH, 1},
    [K_PORT] = {"port", 0, CMD_BOTH, 1},
    [K_CA] = {"ca", 0, CMD_BOTH, 1},
    [K_CERT] = {"cert", 0, CMD_PROVISION, 1},
    [K_KEY] = {"key", 0, CMD_PROVISION, 1},
    [K_TEMPLATE] = {"template", 0, CMD_BOTH, 1},
    [K_PARAM] = {"param", 0, CMD_BOTH, 1},
    [K_OUT] = {"out", 0, CMD_BOTH, 1},
    [K_CREDENTIALS] = {"credentials", 0, CMD_ROTATE, 1},
    [K_STATE_DIR] = {"state-dir", 0, CMD_BOTH, 1},
    [K_FORMAT] = {"format", 0, CMD_BOTH, 1},
    [K_METHOD] = {"method", 0, CMD_BOTH, 1},
    [K_KEY_TYPE] = {"key-type", 0, CMD_BOTH, 1},
    [K_TIMEOUT] = {"timeout", 0, CMD_BOTH, 1},
    [K_DEADLINE] = {"deadline", 0, CMD_BOTH, 1},
    [K_RETRY] = {"retry", 0, CMD_BOTH, 1},
    [K_CLIENT_ID] = {"client-id", 0, CMD_BOTH, 1},
    [K_REPROVISION] = {"reprovision", 1, CMD_PROVISION, 1},
    [K_JSON] = {"json", 1, CMD_BOTH, 1},
    [K_QUIET] = {"quiet", 1, CMD_BOTH, 1},
    [K_VERBOSE] = {"verbose", 1, CMD_BOTH, 1},
    [K_CONFIG] = {"config", 0, CMD_BOTH, 0},
};

/* Where a value came from, for messages: a flag (line 0) or a line of the configuration file. */
struct value {
    char *text; /* owned; NULL when not set */
    unsigned line;
};

struct param {
    char *key;
    char *value;
    unsigned line;
};

struct settings {
    enum command cmd;
    const char *cmd_name;
    struct value v[K_COUNT];
    struct param params[MAX_PARAMS];
    size_t param_count;
    const char *config_path; /* for messages about its lines */
    int json, quiet, verbose; /* resolved early: they shape every message */
};

/* ----------------------------------------------------------------------------------------- */
/* Output */

static int g_json;   /* --json: one JSON object on stdout */
static int g_quiet;  /* --quiet: no progress lines */

/* Writes `s` as a JSON string (with quotes); NULL as null. */
static void json_string(FILE *f, const char *s) {
    if (s == NULL) {
        fputs("null", f);
        return;
    }
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
        switch (*p) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default:
            if (*p < 0x20 || *p == 0x7f) {
                fprintf(f, "\\u%04x", (unsigned)*p);
            } else {
                fputc(*p, f);
            }
        }
    }
    fputc('"', f);
}

/* The failure record printed once, at the end, on stdout (and its message on stderr). */
struct failure {
    int exit_status;
    int have_code;          /* a library result code (else: a usage or input error) */
    fleetprov_result code;
    const char *kind;       /* "usage", "input", "signal", or NULL with have_code */
    char message[2048];
    int retryable;
    unsigned status_code;
    char error_code[256];
    char service_message[1024];
    const char *signal_name;
};

static void copy_text(char *dst, size_t cap, const char *src) {
    snprintf(dst, cap, "%s", src ? src : "");
}

static void print_failure(const struct settings *s, const struct failure *f) {
    const char *name = f->have_code ? fleetprov_result_name((int32_t)f->code) : f->kind;
    fprintf(stderr, "%s: %s%s%s: %s\n", PROG, s->cmd_name ? s->cmd_name : "",
            s->cmd_name ? " failed: " : "", name, f->message);
    if (g_json) {
        printf("{\"status\":\"failed\",\"command\":");
        json_string(stdout, s->cmd_name);
        printf(",\"exit_code\":%d,\"error\":{", f->exit_status);
        if (f->have_code) {
            printf("\"code\":%d,\"name\":", (int)f->code);
        } else {
            printf("\"code\":null,\"name\":");
        }
        json_string(stdout, name);
        printf(",\"message\":");
        json_string(stdout, f->message);
        printf(",\"retryable\":%s", f->retryable ? "true" : "false");
        if (f->have_code && f->code == FLEETPROV_REJECTED) {
            printf(",\"status_code\":%u,\"error_code\":", f->status_code);
            json_string(stdout, f->error_code);
            printf(",\"error_message\":");
            json_string(stdout, f->service_message);
        }
        if (f->signal_name != NULL) {
            printf(",\"signal\":");
            json_string(stdout, f->signal_name);
        }
        printf("}}\n");
    } else {
        printf("status=failed\nresult=%s\nexit_code=%d\nerror=%s\nretryable=%d\n", name,
               f->exit_status, f->message, f->retryable);
        if (f->have_code && f->code == FLEETPROV_REJECTED) {
            printf("status_code=%u\nerror_code=%s\nerror_message=%s\n", f->status_code,
                   f->error_code, f->service_message);
        }
    }
    fflush(stdout);
}

/* A usage or input error found by the program itself; returns its exit status. */
static int fail(const struct settings *s, int status, const char *kind, const char *fmt, ...) {
    struct failure f;
    memset(&f, 0, sizeof f);
    f.exit_status = status;
    f.kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f.message, sizeof f.message, fmt, ap);
    va_end(ap);
    print_failure(s, &f);
    return status;
}

/* ----------------------------------------------------------------------------------------- */
/* Exit status by class of error */

static volatile sig_atomic_t g_signal; /* the signal that cancelled the flow, or 0 */

static int exit_status(fleetprov_result r, int retryable) {
    switch (r) {
    case FLEETPROV_OK:
        return 0;
    case FLEETPROV_INVALID_ARGUMENT:
        return EXIT_DATAERR;
    case FLEETPROV_TLS:
    case FLEETPROV_SUBSCRIBE_FAILED:
        return EXIT_NOPERM;
    case FLEETPROV_CONNECTION:
        return EXIT_UNAVAILABLE;
    case FLEETPROV_TIMEOUT:
    case FLEETPROV_DEADLINE:
    case FLEETPROV_BUSY:
        return EXIT_TEMPFAIL;
    case FLEETPROV_REJECTED:
        return retryable ? EXIT_TEMPFAIL : EXIT_NOPERM; /* 429 and 5xx: later; 4xx: refused */
    case FLEETPROV_MALFORMED_REPLY:
    case FLEETPROV_CERTIFICATE_MISMATCH:
        return EXIT_PROTOCOL;
    case FLEETPROV_CANCELLED:
        return g_signal == SIGTERM ? EXIT_SIGTERM : EXIT_SIGINT;
    case FLEETPROV_STORAGE:
        return EXIT_CANTCREAT;
    case FLEETPROV_BUFFER_TOO_SMALL:
    case FLEETPROV_PANIC:
    case FLEETPROV_IN_PROGRESS:
    case FLEETPROV_INTERNAL:
    case FLEETPROV_IN_CALLBACK:
    default:
        return EXIT_SOFTWARE;
    }
}

/* A library call failed with `r`: prints the thread's last error; returns the exit status. */
static int library_failure(const struct settings *s, const char *what, fleetprov_result r) {
    struct failure f;
    memset(&f, 0, sizeof f);
    f.have_code = 1;
    f.code = r;
    fleetprov_error *e = fleetprov_last_error();
    if (e != NULL) {
        f.retryable = fleetprov_error_is_retryable(e);
        f.status_code = fleetprov_error_status_code(e);
        snprintf(f.message, sizeof f.message, "%s", fleetprov_error_message(e));
        copy_text(f.error_code, sizeof f.error_code, fleetprov_error_code(e));
        copy_text(f.service_message, sizeof f.service_message, fleetprov_error_service_message(e));
        fleetprov_error_free(e);
    }
    if (f.message[0] == '\0') {
        snprintf(f.message, sizeof f.message, "%s failed", what);
    }
    if (r == FLEETPROV_CANCELLED && g_signal != 0) {
        f.signal_name = g_signal == SIGTERM ? "SIGTERM" : "SIGINT";
    }
    f.exit_status = exit_status(r, f.retryable);
    print_failure(s, &f);
    return f.exit_status;
}

/* ----------------------------------------------------------------------------------------- */
/* Usage */

static void usage(FILE *f) {
    fprintf(f,
"usage: fleetprov provision --endpoint HOST [--port N] [--ca CA.pem] --cert CLAIM.pem\n"
"                           --key CLAIM.key --template NAME [--param KEY=VALUE]... --out DIR\n"
"                           [--state-dir DIR] [--format json|cbor] [--method csr|keys]\n"
"                           [--key-type p256|p384] [--timeout MS] [--deadline MS]\n"
"                           [--retry ATTEMPTS,FIRST_MS,MAX_MS] [--client-id ID] [--reprovision]\n"
"                           [--config FILE] [--json] [--quiet] [--verbose]\n"
"       fleetprov rotate --endpoint HOST [--port N] [--ca CA.pem] --template NAME\n"
"                        [--param KEY=VALUE]... --out DIR [--credentials DIR] [...]\n"
"       fleetprov --version [--json]\n"
"       fleetprov help\n"
"\n"
"provision  Provisions the device through AWS IoT fleet provisioning with the claim\n"
"           certificate and writes certificate.pem, private.key (0600) and device.json to\n"
"           --out DIR (created 0700). When DIR already holds a complete set from an earlier\n"
"           run (and no certificate is pending in the state directory), nothing is sent and\n"
"           the status is already_provisioned (exit 0); --reprovision makes a new one anyway.\n"
"rotate     Connects with the credentials in --credentials DIR (default: --out DIR), makes\n"
"           a new certificate through a rotation template, connects with it and only then\n"
"           replaces the credentials (in --out DIR). --cert and --key are not used.\n"
"\n");
    /* Three strings: ISO C guarantees string literals of 4095 bytes only. */
    fprintf(f,
"options:\n"
"  --endpoint HOST      AWS IoT Core data endpoint (also the TLS server name)\n"
"  --port N             8883 (default), or 443 (ALPN x-amzn-mqtt-ca)\n"
"  --ca FILE            CA certificates, PEM (default: the system's roots)\n"
"  --cert, --key FILE   the claim certificate and its key, PEM\n"
"  --template NAME      the provisioning (or rotation) template\n"
"  --param KEY=VALUE    a template parameter (repeatable)\n"
"  --out DIR            where the credentials are written\n"
"  --state-dir DIR      the resume journal: a run cut short (Ctrl-C, crash, power loss,\n"
"                       failure) is resumed by the next instead of minting another certificate\n"
"  --format json|cbor   payload format (default json)\n"
"  --method csr|keys    CreateCertificateFromCsr with a key made here (default), or\n"
"                       CreateKeysAndCertificate\n"
"  --key-type p256|p384 the key made for csr (default p256)\n"
"  --timeout MS         per step (default 10000); --deadline MS overall (default 60000,\n"
"                       0: none)\n"
"  --retry A,FIRST,MAX  attempts in all, first and largest pause in ms (default 5,1000,30000)\n"
"  --client-id ID       MQTT client id (default: random)\n"
"  --config FILE        read settings from FILE: `key = value` lines, keys named like the\n"
"                       long options (param may repeat; switches take yes or no), `#` starts\n"
"                       a comment line; options on the command line override the file, and a\n"
"                       --param replaces the file's value of the same key. Keys of the other\n"
"                       command are ignored, so one file serves both.\n"
"  --json               print the outcome as one JSON object on stdout\n"
"  --quiet              no progress lines on stderr (errors still are)\n"
"  --verbose            the library's log lines too\n"
"\n");
    fprintf(f,
"exit status:\n"
"  0    provisioned, already provisioned, or rotated\n"
"  64   usage: a bad option or configuration line (its line number is given)\n"
"  65   an input file is unusable (not PEM, key of another certificate), a bad template name\n"
"  66   an input file (configuration, CA, claim certificate or key) cannot be read\n"
"  69   the endpoint cannot be reached (connection refused, no route, name does not resolve)\n"
"  70   internal error, or a library of another ABI\n"
"  73   the credentials or the journal cannot be written\n"
"  75   temporary: timeout, throttled or 5xx (429/500/503), state directory busy; try later\n"
"  76   the service's answer is unusable (malformed reply, certificate not of our key)\n"
"  77   refused: the template or a parameter (4xx), the TLS handshake (claim certificate\n"
"       not registered, wrong CA), a subscription denied by the policy\n"
"  130  interrupted by SIGINT, 143 by SIGTERM: the journal is kept; run again to resume\n"
"       (a second signal ends the program at once)\n");
}

/* ----------------------------------------------------------------------------------------- */
/* Settings: command line and configuration file */

static int find_key(const char *name) {
    for (int k = 0; k < K_COUNT; k++) {
        if (strcmp(KEYS[k].name, name) == 0) {
            return k;
        }
    }
    return -1;
}

static void settings_free(struct settings *s) {
    for (int k = 0; k < K_COUNT; k++) {
        free(s->v[k].text);
    }
    for (size_t i = 0; i < s->param_count; i++) {
        free(s->params[i].key);
        free(s->params[i].value);
    }
}

/* "--port" or "FILE:LINE: port", for messages. */
static const char *where(const struct settings *s, int k, unsigned line, char *buf, size_t cap) {
    if (line == 0) {
        snprintf(buf, cap, "--%s", KEYS[k].name);
    } else {
        snprintf(buf, cap, "%s:%u: %s", s->config_path, line, KEYS[k].name);
    }
    return buf;
}

/* Adds KEY=VALUE; a later one with the same key replaces it, unless `keep` (the file's lines
 * do not replace the command line's). 0, or an exit status (message printed). */
static int add_param(struct settings *s, const char *kv, unsigned line, int keep) {
    char w[512];
    const char *eq = strchr(kv, '=');
    if (eq == NULL || eq == kv) {
        return fail(s, EXIT_USAGE, "usage", "%s wants KEY=VALUE, got '%s'",
                    where(s, K_PARAM, line, w, sizeof w), kv);
    }
    size_t klen = (size_t)(eq - kv);
    for (size_t i = 0; i < s->param_count; i++) {
        if (strlen(s->params[i].key) == klen && strncmp(s->params[i].key, kv, klen) == 0) {
            if (keep && s->params[i].line != 0) {
                return fail(s, EXIT_USAGE, "usage", "%s:%u: parameter '%s' given twice (first "
                            "on line %u)", s->config_path, line, s->params[i].key,
                            s->params[i].line);
            }
            if (keep) {
                return 0; /* the command line's value stays */
            }
            char *v = strdup(eq + 1);
            if (v == NULL) {
                return fail(s, EXIT_SOFTWARE, "internal", "out of memory");
            }
            free(s->params[i].value);
            s->params[i].value = v;
            s->params[i].line = line;
            return 0;
        }
    }
    if (s->param_count == MAX_PARAMS) {
        return fail(s, EXIT_USAGE, "usage", "%s: more than %d parameters",
                    where(s, K_PARAM, line, w, sizeof w), MAX_PARAMS);
    }
    struct param *p = &s->params[s->param_count];
    p->key = strndup(kv, klen);
    p->value = strdup(eq + 1);
    p->line = line;
    if (p->key == NULL || p->value == NULL) {
        free(p->key);
        free(p->value);
        return fail(s, EXIT_SOFTWARE, "internal", "out of memory");
    }
    s->param_count++;
    return 0;
}

static int set_value(struct settings *s, int k, const char *text, unsigned line) {
    char *copy = strdup(text);
    if (copy == NULL) {
        return fail(s, EXIT_SOFTWARE, "internal", "out of memory");
    }
    free(s->v[k].text);
    s->v[k].text = copy;
    s->v[k].line = line;
    return 0;
}

/* The command line after the command name. 0, or an exit status. */
static int parse_flags(struct settings *s, int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return -1; /* exit 0 */
        }
        int k = strncmp(a, "--", 2) == 0 ? find_key(a + 2) : -1;
        if (k < 0) {
            return fail(s, EXIT_USAGE, "usage", "unknown option '%s' (fleetprov help)", a);
        }
        if ((KEYS[k].cmds & s->cmd) == 0) {
            return fail(s, EXIT_USAGE, "usage", "%s is not an option of %s", a, s->cmd_name);
        }
        if (KEYS[k].is_switch) {
            int r = set_value(s, k, "yes", 0);
            if (r != 0) {
                return r;
            }
            continue;
        }
        if (i + 1 >= argc) {
            return fail(s, EXIT_USAGE, "usage", "%s needs a value", a);
        }
        const char *v = argv[++i];
        int r = k == K_PARAM ? add_param(s, v, 0, 0) : set_value(s, k, v, 0);
        if (r != 0) {
            return r;
        }
    }
    return 0;
}

static char *trim(char *p) {
    while (*p == ' ' || *p == '\t') {
        p++;
    }
    size_t n = strlen(p);
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '\n' ||
                     p[n - 1] == '\r')) {
        p[--n] = '\0';
    }
    return p;
}

/* Reads the configuration file; values already set on the command line are kept. */
static int parse_file(struct settings *s, const char *path) {
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return fail(s, EXIT_NOINPUT, "input", "cannot read configuration file %s: %s", path,
                    strerror(errno));
    }
    unsigned seen[K_COUNT] = {0}; /* the line each key was read from */
    char *line = NULL;
    size_t cap = 0;
    unsigned n = 0;
    int status = 0;
    while (status == 0 && getline(&line, &cap, f) >= 0) {
        n++;
        char *p = trim(line);
        if (*p == '\0' || *p == '#') {
            continue;
        }
        char *eq = strchr(p, '=');
        if (eq == NULL) {
            status = fail(s, EXIT_USAGE, "usage", "%s:%u: expected `key = value`", path, n);
            break;
        }
        *eq = '\0';
        char *name = trim(p), *value = trim(eq + 1);
        int k = find_key(name);
        if (k < 0 || !KEYS[k].in_file) {
            status = fail(s, EXIT_USAGE, "usage", "%s:%u: unknown key '%s'", path, n, name);
            break;
        }
        if (*value == '\0') {
            status = fail(s, EXIT_USAGE, "usage", "%s:%u: '%s' has no value", path, n, name);
            break;
        }
        if (k != K_PARAM && seen[k] != 0) {
            status = fail(s, EXIT_USAGE, "usage", "%s:%u: '%s' given twice (first on line %u)",
                          path, n, name, seen[k]);
            break;
        }
        seen[k] = n;
        if (KEYS[k].is_switch) {
            int yes = strcmp(value, "yes") == 0 || strcmp(value, "true") == 0 ||
                      strcmp(value, "1") == 0 || strcmp(value, "on") == 0;
            int no = strcmp(value, "no") == 0 || strcmp(value, "false") == 0 ||
                     strcmp(value, "0") == 0 || strcmp(value, "off") == 0;
            if (!yes && !no) {
                status = fail(s, EXIT_USAGE, "usage", "%s:%u: '%s' wants yes or no, got '%s'",
                              path, n, name, value);
                break;
            }
            value = yes ? "yes" : "no";
        }
        if ((KEYS[k].cmds & s->cmd) == 0) {
            continue; /* the other command's: one file serves both */
        }
        if (k == K_PARAM) {
            status = add_param(s, value, n, 1);
        } else if (s->v[k].text == NULL) {
            status = set_value(s, k, value, n);
        }
    }
    if (status == 0 && ferror(f)) {
        status = fail(s, EXIT_NOINPUT, "input", "cannot read configuration file %s: %s", path,
                      strerror(errno));
    }
    free(line);
    fclose(f);
    return status;
}

static int is_yes(const struct settings *s, int k) {
    return s->v[k].text != NULL && strcmp(s->v[k].text, "yes") == 0;
}

/* Parses a decimal uint32_t that must fill `text` up to `stop`; sets *end past it. */
static int parse_u32(const char *text, char stop, const char **end, uint32_t *out) {
    if (*text < '0' || *text > '9') {
        return -1;
    }
    errno = 0;
    char *e = NULL;
    unsigned long v = strtoul(text, &e, 10);
    if (errno != 0 || *e != stop || v > UINT32_MAX) {
        return -1;
    }
    *out = (uint32_t)v;
    *end = e;
    return 0;
}

/* The typed settings, checked. */
struct resolved {
    uint16_t port;
    int32_t format, method, key_type;
    uint32_t step_ms, overall_ms;
    int have_timeouts;
    uint32_t retry[3];
    int have_retry;
};

static int bad_value(const struct settings *s, int k, const char *want) {
    char w[512];
    return fail(s, EXIT_USAGE, "usage", "%s: %s, got '%s'", where(s, k, s->v[k].line, w, sizeof w),
                want, s->v[k].text);
}

/* One of `names` (NULL-terminated): its index in *out, or a usage error. */
static int choose(const struct settings *s, int k, const char *const *names, const int32_t *values,
                  const char *want, int32_t *out) {
    if (s->v[k].text == NULL) {
        return 0;
    }
    for (size_t i = 0; names[i] != NULL; i++) {
        if (strcmp(s->v[k].text, names[i]) == 0) {
            *out = values[i];
            return 0;
        }
    }
    return bad_value(s, k, want);
}

static int resolve(const struct settings *s, struct resolved *r) {
    memset(r, 0, sizeof *r);
    r->port = 8883;
    r->format = FLEETPROV_FORMAT_JSON;
    r->method = FLEETPROV_METHOD_CSR;
    r->key_type = FLEETPROV_KEY_P256;
    const char *end = NULL;
    uint32_t v = 0;
    if (s->v[K_PORT].text != NULL) {
        if (parse_u32(s->v[K_PORT].text, '\0', &end, &v) != 0 || v == 0 || v > 65535) {
            return bad_value(s, K_PORT, "a port wants 1 to 65535");
        }
        r->port = (uint16_t)v;
    }
    static const char *const formats[] = {"json", "cbor", NULL};
    static const int32_t format_values[] = {FLEETPROV_FORMAT_JSON, FLEETPROV_FORMAT_CBOR};
    static const char *const methods[] = {"csr", "keys", NULL};
    static const int32_t method_values[] = {FLEETPROV_METHOD_CSR, FLEETPROV_METHOD_CREATE_KEYS};
    static const char *const key_types[] = {"p256", "p384", NULL};
    static const int32_t key_type_values[] = {FLEETPROV_KEY_P256, FLEETPROV_KEY_P384};
    int st = choose(s, K_FORMAT, formats, format_values, "json or cbor", &r->format);
    if (st == 0) {
        st = choose(s, K_METHOD, methods, method_values, "csr or keys", &r->method);
    }
    if (st == 0) {
        st = choose(s, K_KEY_TYPE, key_types, key_type_values, "p256 or p384", &r->key_type);
    }
    if (st != 0) {
        return st;
    }
    r->step_ms = 10000;
    r->overall_ms = 60000;
    if (s->v[K_TIMEOUT].text != NULL) {
        if (parse_u32(s->v[K_TIMEOUT].text, '\0', &end, &r->step_ms) != 0 || r->step_ms == 0) {
            return bad_value(s, K_TIMEOUT, "milliseconds, more than 0");
        }
        r->have_timeouts = 1;
    }
    if (s->v[K_DEADLINE].text != NULL) {
        if (parse_u32(s->v[K_DEADLINE].text, '\0', &end, &r->overall_ms) != 0) {
            return bad_value(s, K_DEADLINE, "milliseconds (0: none)");
        }
        r->have_timeouts = 1;
    }
    if (s->v[K_RETRY].text != NULL) {
        const char *p = s->v[K_RETRY].text;
        if (parse_u32(p, ',', &p, &r->retry[0]) != 0 ||
            parse_u32(p + 1, ',', &p, &r->retry[1]) != 0 ||
            parse_u32(p + 1, '\0', &p, &r->retry[2]) != 0) {
            return bad_value(s, K_RETRY, "ATTEMPTS,FIRST_MS,MAX_MS");
        }
        r->have_retry = 1;
    }
    /* What each command needs. */
    static const int provision_needs[] = {K_ENDPOINT, K_CERT, K_KEY, K_TEMPLATE, K_OUT};
    static const int rotate_needs[] = {K_ENDPOINT, K_TEMPLATE};
    const int *needs = s->cmd == CMD_PROVISION ? provision_needs : rotate_needs;
    size_t count = s->cmd == CMD_PROVISION ? 5 : 2;
    for (size_t i = 0; i < count; i++) {
        if (s->v[needs[i]].text == NULL) {
            return fail(s, EXIT_USAGE, "usage", "--%s is required (fleetprov help)",
                        KEYS[needs[i]].name);
        }
    }
    if (s->cmd == CMD_ROTATE && s->v[K_OUT].text == NULL && s->v[K_CREDENTIALS].text == NULL) {
        return fail(s, EXIT_USAGE, "usage", "--out (or --credentials) is required (fleetprov help)");
    }
    return 0;
}

/* Input files are opened here first, so that one that cannot be read has its own status. */
static int check_readable(const struct settings *s, int k, const char *what) {
    const char *path = s->v[k].text;
    if (path == NULL) {
        return 0;
    }
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        return fail(s, EXIT_NOINPUT, "input", "cannot read %s %s: %s", what, path, strerror(errno));
    }
    close(fd);
    return 0;
}

/* ----------------------------------------------------------------------------------------- */
/* Callbacks and signals */

static const char *step_name(fleetprov_step step) {
    static const char *const names[] = {
        "connecting",  "subscribing", "subscribed", "creating_certificate", "certificate_created",
        "registering", "registered",  "verifying",  "verified",             "resuming",
        "restarting",  "retrying",    "committed"};
    if (step < 0 || (size_t)step >= sizeof names / sizeof names[0]) {
        return "unknown";
    }
    return names[step];
}

/* Runs on the calling thread, inside the blocking call. */
static void on_progress(void *userdata, const fleetprov_progress *p) {
    (void)userdata;
    if (g_quiet) {
        return;
    }
    if (p->step == FLEETPROV_STEP_RETRYING) {
        const fleetprov_error *e = p->error;
        fprintf(stderr, "%s: step: retrying (attempt %u failed, next in %llu ms): %s: %s\n", PROG,
                (unsigned)p->attempt, (unsigned long long)p->retry_in_ms,
                e ? fleetprov_result_name((int32_t)fleetprov_error_result(e)) : "?",
                e ? fleetprov_error_message(e) : "");
    } else {
        fprintf(stderr, "%s: step: %s (attempt %u)\n", PROG, step_name(p->step),
                (unsigned)p->attempt);
    }
}

static void on_log(void *userdata, fleetprov_log_level level, const char *message, size_t len) {
    (void)userdata;
    static const char *const levels[] = {"?", "error", "warn", "info", "debug"};
    if (g_quiet && level > FLEETPROV_LOG_ERROR) {
        return;
    }
    fprintf(stderr, "%s: %s: %.*s\n", PROG, (level >= 1 && level <= 4) ? levels[level] : "?",
            (int)len, message);
}

static fleetprov_cancel *g_cancel; /* set before the handlers are installed */

static void on_signal(int sig) {
    if (g_signal == 0) {
        g_signal = sig;
    }
    fleetprov_cancel_trigger(g_cancel); /* async-signal-safe */
}

/* ----------------------------------------------------------------------------------------- */
/* The commands */

static void print_path_field(const char *dir, const char *name, const char *key, int json) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (json) {
        printf("\"%s\":", key);
        json_string(stdout, path);
    } else {
        printf("%s=%s\n", key, path);
    }
}

static void print_success(const struct settings *s, const fleetprov_provisioned *p) {
    int already = fleetprov_provisioned_already_provisioned(p);
    const char *status = s->cmd == CMD_ROTATE ? "rotated"
                         : already            ? "already_provisioned"
                                              : "provisioned";
    const char *dir = fleetprov_provisioned_output_dir(p);
    if (dir == NULL) { /* a rotation in place */
        dir = s->v[K_CREDENTIALS].text ? s->v[K_CREDENTIALS].text : s->v[K_OUT].text;
    }
    size_t n = fleetprov_provisioned_config_count(p);
    if (g_json) {
        printf("{\"status\":\"%s\",\"command\":\"%s\",\"exit_code\":0,\"already_provisioned\":%s,"
               "\"thing_name\":",
               status, s->cmd_name, already ? "true" : "false");
        json_string(stdout, fleetprov_provisioned_thing_name(p));
        printf(",\"certificate_id\":");
        json_string(stdout, fleetprov_provisioned_certificate_id(p));
        printf(",\"output_dir\":");
        json_string(stdout, dir);
        printf(",\"files\":{");
        print_path_field(dir, "certificate.pem", "certificate", 1);
        printf(",");
        print_path_field(dir, "private.key", "private_key", 1);
        printf(",");
        print_path_field(dir, "device.json", "device", 1);
        printf("},\"attempts\":%u,\"resumed\":%s,\"registration_confirmed\":%s,"
               "\"device_configuration\":{",
               (unsigned)fleetprov_provisioned_attempts(p),
               fleetprov_provisioned_resumed(p) ? "true" : "false",
               fleetprov_provisioned_registration_confirmed(p) ? "true" : "false");
        for (size_t i = 0; i < n; i++) {
            const char *k = NULL, *v = NULL;
            if (fleetprov_provisioned_config_entry(p, i, &k, &v) == FLEETPROV_OK) {
                printf("%s", i > 0 ? "," : "");
                json_string(stdout, k);
                printf(":");
                json_string(stdout, v);
            }
        }
        printf("}}\n");
    } else {
        printf("status=%s\nthing_name=%s\ncertificate_id=%s\noutput_dir=%s\n", status,
               fleetprov_provisioned_thing_name(p), fleetprov_provisioned_certificate_id(p), dir);
        print_path_field(dir, "certificate.pem", "certificate", 0);
        print_path_field(dir, "private.key", "private_key", 0);
        print_path_field(dir, "device.json", "device", 0);
        printf("attempts=%u\nresumed=%d\nalready_provisioned=%d\n",
               (unsigned)fleetprov_provisioned_attempts(p),
               fleetprov_provisioned_resumed(p) ? 1 : 0, already ? 1 : 0);
        for (size_t i = 0; i < n; i++) {
            const char *k = NULL, *v = NULL;
            if (fleetprov_provisioned_config_entry(p, i, &k, &v) == FLEETPROV_OK) {
                printf("device_config.%s=%s\n", k, v);
            }
        }
    }
    fflush(stdout);
    if (!g_quiet) {
        if (already) {
            fprintf(stderr, "%s: %s holds the credentials of an earlier run: nothing to do\n", PROG,
                    dir);
        } else {
            fprintf(stderr, "%s: %s %s as %s (certificate %.12s..., %u attempt%s)\n", PROG,
                    s->cmd == CMD_ROTATE ? "rotated" : "provisioned", dir,
                    fleetprov_provisioned_thing_name(p), fleetprov_provisioned_certificate_id(p),
                    (unsigned)fleetprov_provisioned_attempts(p),
                    fleetprov_provisioned_attempts(p) == 1 ? "" : "s");
        }
    }
}

/* Builds the library's config and runs the command. Returns the exit status. */
static int run(const struct settings *s, const struct resolved *r) {
    int st = check_readable(s, K_CA, "CA file");
    if (st == 0 && s->cmd == CMD_PROVISION) {
        st = check_readable(s, K_CERT, "claim certificate");
    }
    if (st == 0 && s->cmd == CMD_PROVISION) {
        st = check_readable(s, K_KEY, "claim key");
    }
    if (st != 0) {
        return st;
    }
    fleetprov_config *cfg = NULL;
    fleetprov_provisioned *p = NULL;
    const char *what = "fleetprov_config_new";
    fleetprov_result res = fleetprov_config_new(&cfg);
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_endpoint";
        res = fleetprov_config_set_endpoint(cfg, s->v[K_ENDPOINT].text, r->port);
    }
    if (res == FLEETPROV_OK && s->v[K_CA].text != NULL) {
        what = "fleetprov_config_set_ca_file";
        res = fleetprov_config_set_ca_file(cfg, s->v[K_CA].text);
    }
    if (res == FLEETPROV_OK && s->cmd == CMD_PROVISION) {
        what = "fleetprov_config_set_claim_files";
        res = fleetprov_config_set_claim_files(cfg, s->v[K_CERT].text, s->v[K_KEY].text);
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_template";
        res = fleetprov_config_set_template(cfg, s->v[K_TEMPLATE].text);
    }
    for (size_t i = 0; res == FLEETPROV_OK && i < s->param_count; i++) {
        what = "fleetprov_config_set_parameter";
        res = fleetprov_config_set_parameter(cfg, s->params[i].key, s->params[i].value);
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_format";
        res = fleetprov_config_set_format(cfg, r->format);
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_method";
        res = fleetprov_config_set_method(cfg, r->method);
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_key_type";
        res = fleetprov_config_set_key_type(cfg, r->key_type);
    }
    if (res == FLEETPROV_OK && r->have_timeouts) {
        what = "fleetprov_config_set_timeouts";
        res = fleetprov_config_set_timeouts(cfg, r->step_ms, r->overall_ms);
    }
    if (res == FLEETPROV_OK && r->have_retry) {
        what = "fleetprov_config_set_retry";
        res = fleetprov_config_set_retry(cfg, r->retry[0], r->retry[1], r->retry[2]);
    }
    if (res == FLEETPROV_OK && s->v[K_CLIENT_ID].text != NULL) {
        what = "fleetprov_config_set_client_id";
        res = fleetprov_config_set_client_id(cfg, s->v[K_CLIENT_ID].text);
    }
    /* provision: --out. rotate: the credentials in --credentials (default --out) are replaced,
     * or the new ones go to --out when both are given. */
    const char *credentials = s->v[K_CREDENTIALS].text ? s->v[K_CREDENTIALS].text
                                                       : s->v[K_OUT].text;
    if (res == FLEETPROV_OK && s->v[K_OUT].text != NULL &&
        (s->cmd == CMD_PROVISION || s->v[K_CREDENTIALS].text != NULL)) {
        what = "fleetprov_config_set_output_dir";
        res = fleetprov_config_set_output_dir(cfg, s->v[K_OUT].text);
    }
    if (res == FLEETPROV_OK && s->v[K_STATE_DIR].text != NULL) {
        what = "fleetprov_config_set_state_dir";
        res = fleetprov_config_set_state_dir(cfg, s->v[K_STATE_DIR].text);
    }
    if (res == FLEETPROV_OK && s->cmd == CMD_PROVISION) {
        what = "fleetprov_config_set_reprovision";
        res = fleetprov_config_set_reprovision(cfg, is_yes(s, K_REPROVISION));
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_progress_callback";
        res = fleetprov_config_set_progress_callback(cfg, on_progress, NULL, NULL);
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_log_callback";
        res = fleetprov_config_set_log_callback(
            cfg, on_log, NULL, NULL, s->verbose ? FLEETPROV_LOG_DEBUG : FLEETPROV_LOG_WARN);
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_cancel_new";
        res = fleetprov_cancel_new(&g_cancel);
    }
    if (res == FLEETPROV_OK) {
        what = "fleetprov_config_set_cancel";
        res = fleetprov_config_set_cancel(cfg, g_cancel);
    }
    if (res == FLEETPROV_OK) {
        struct sigaction sa, old_int, old_term;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        /* Once: a second signal ends the program at once (the journal is crash-safe). */
        sa.sa_flags = SA_RESETHAND;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
        if (s->cmd == CMD_ROTATE) {
            what = "fleetprov_rotate";
            res = fleetprov_rotate(cfg, credentials, &p);
        } else {
            what = "fleetprov_provision";
            res = fleetprov_provision(cfg, &p);
        }
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    int status = 0;
    if (res != FLEETPROV_OK) {
        status = library_failure(s, what, res);
        if (res == FLEETPROV_CANCELLED) {
            if (s->v[K_STATE_DIR].text != NULL || s->cmd == CMD_ROTATE) {
                fprintf(stderr, "%s: interrupted; the resume journal is kept: run the same "
                                "command again to resume\n", PROG);
            } else {
                fprintf(stderr, "%s: interrupted (no --state-dir: a new run starts over)\n",
                        PROG);
            }
        }
    } else {
        print_success(s, p);
    }
    fleetprov_provisioned_free(p);
    fleetprov_config_free(cfg);
    fleetprov_cancel_free(g_cancel);
    g_cancel = NULL;
    return status;
}

static int version(int json) {
    int ok = FLEETPROV_ABI_COMPATIBLE();
    if (json) {
        printf("{\"version\":\"%s\",\"library_version\":", FLEETPROV_VERSION);
        json_string(stdout, fleetprov_version());
        printf(",\"abi\":%d,\"library_abi\":%u,\"compatible\":%s}\n", FLEETPROV_ABI_VERSION,
               (unsigned)fleetprov_abi_version(), ok ? "true" : "false");
    } else {
        printf("fleetprov %s (library %s, ABI %u)\n", FLEETPROV_VERSION, fleetprov_version(),
               (unsigned)fleetprov_abi_version());
    }
    if (!ok) {
        fprintf(stderr, "%s: built for the library's ABI %d, but the one loaded has ABI %u\n", PROG,
                FLEETPROV_ABI_VERSION, (unsigned)fleetprov_abi_version());
        return EXIT_SOFTWARE;
    }
    return 0;
}

int main(int argc, char **argv) {
    struct settings s;
    memset(&s, 0, sizeof s);
    /* --json and --quiet shape every message, usage errors included: look for them first. */
    for (int i = 1; i < argc; i++) {
        g_json |= strcmp(argv[i], "--json") == 0;
        g_quiet |= strcmp(argv[i], "--quiet") == 0;
    }
    const char *cmd = argc > 1 ? argv[1] : "";
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        return version(g_json);
    }
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (!FLEETPROV_ABI_COMPATIBLE()) {
        return fail(&s, EXIT_SOFTWARE, "internal",
                    "built for the library's ABI %d, but the one loaded has ABI %u",
                    FLEETPROV_ABI_VERSION, (unsigned)fleetprov_abi_version());
    }
    if (strcmp(cmd, "provision") == 0) {
        s.cmd = CMD_PROVISION;
    } else if (strcmp(cmd, "rotate") == 0) {
        s.cmd = CMD_ROTATE;
    } else {
        if (!g_json) {
            usage(stderr);
        }
        return fail(&s, EXIT_USAGE, "usage",
                    argc > 1 ? "unknown command '%s'" : "no command%s", cmd);
    }
    s.cmd_name = cmd;
    int status = parse_flags(&s, argc - 2, argv + 2);
    if (status == -1) {
        settings_free(&s);
        return 0; /* --help */
    }
    if (status == 0 && s.v[K_CONFIG].text != NULL) {
        s.config_path = s.v[K_CONFIG].text;
        status = parse_file(&s, s.config_path);
    }
    if (status == 0) {
        /* The file may turn them on too. */
        s.json = g_json = g_json || is_yes(&s, K_JSON);
        s.quiet = g_quiet = g_quiet || is_yes(&s, K_QUIET);
        s.verbose = is_yes(&s, K_VERBOSE);
        struct resolved r;
        status = resolve(&s, &r);
        if (status == 0) {
            status = run(&s, &r);
        }
    }
    settings_free(&s);
    return status;
}
