/* Shared helpers of the fleetprov C examples. */
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define STOP_LIMIT_S 120

/* Parses a decimal uint32_t from `s` up to `stop` (a character that must follow it, or '\0'),
 * setting *end past it. 0 or -1. */
static int parse_u32(const char *s, char stop, const char **end, uint32_t *out) {
    char *e = NULL;
    if (*s < '0' || *s > '9') {
        return -1; /* strtoul would accept blanks and a sign */
    }
    errno = 0;
    unsigned long v = strtoul(s, &e, 10);
    if (errno != 0 || e == s || *e != stop || v > UINT32_MAX) {
        return -1;
    }
    *out = (uint32_t)v;
    *end = e;
    return 0;
}

void example_usage(const char *prog, const struct example_option *extra, size_t count) {
    fprintf(stderr,
            "usage: %s --endpoint HOST [--port N] [--ca CA.pem] --cert CLAIM.pem --key CLAIM.key\n"
            "       --template NAME [--param KEY=VALUE]... [--out DIR] [--format json|cbor]\n"
            "       [--method csr|keys] [--timeout MS] [--client-id ID] [--no-verify] [--wait MS]\n"
            "       [--state-dir DIR] [--retry MAX_ATTEMPTS,INITIAL_MS,MAX_MS] [--mqtt 5|3.1.1]\n",
            prog);
    size_t column = 0;
    for (size_t i = 0; i < count; i++) {
        const char *value = extra[i].value_name ? extra[i].value_name : "";
        size_t width = strlen(extra[i].flag) + (*value ? 1 + strlen(value) : 0) + 3;
        if (column == 0 || column + width > 96) { /* a new line, indented as the ones above */
            fprintf(stderr, "%s      ", column == 0 ? "" : "\n");
            column = 7;
        }
        fprintf(stderr, " [%s%s%s]", extra[i].flag, *value ? " " : "", value);
        column += width;
    }
    if (count > 0) {
        fprintf(stderr, "\n");
    }
}

/* The extra option named `flag`, or NULL. */
static const struct example_option *find_option(const struct example_option *extra,
                                                size_t count, const char *flag) {
    for (size_t i = 0; i < count; i++) {
        if (strcmp(extra[i].flag, flag) == 0) {
            return &extra[i];
        }
    }
    return NULL;
}

int example_parse_args(int argc, char **argv, struct example_args *a, int require_out) {
    return example_parse_args_with(argc, argv, a, require_out ? EXAMPLE_REQUIRE_OUT : 0, NULL, 0);
}

int example_parse_args_with(int argc, char **argv, struct example_args *a, unsigned flags,
                            const struct example_option *extra, size_t count) {
    /* First thing: the library loaded must have the ABI of the header we were built with. */
    if (!FLEETPROV_ABI_COMPATIBLE()) {
        fprintf(stderr, "%s: built against the fleetprov ABI %d but loaded a library of ABI %u\n",
                argv[0], FLEETPROV_ABI_VERSION, (unsigned)fleetprov_abi_version());
        return -1;
    }
    memset(a, 0, sizeof *a);
    a->port = 8883;
    a->format = FLEETPROV_FORMAT_JSON;
    a->method = FLEETPROV_METHOD_CSR;
    a->verify = 1;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--no-verify") == 0) {
            a->verify = 0;
            continue;
        }
        if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
            example_usage(argv[0], extra, count);
            return -1;
        }
        const struct example_option *opt = find_option(extra, count, flag);
        if (opt != NULL && opt->value_name == NULL) {
            if (opt->given != NULL) {
                *opt->given = 1;
            }
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value\n", argv[0], flag);
            example_usage(argv[0], extra, count);
            return -1;
        }
        if (opt != NULL) {
            *opt->value = argv[++i];
            if (opt->given != NULL) {
                *opt->given = 1;
            }
            continue;
        }
        const char *v = argv[++i];
        if (strcmp(flag, "--endpoint") == 0) {
            a->endpoint = v;
        } else if (strcmp(flag, "--port") == 0) {
            char *end = NULL;
            errno = 0;
            unsigned long p = strtoul(v, &end, 10);
            if (errno != 0 || end == v || *end != '\0' || p == 0 || p > 65535) {
                fprintf(stderr, "%s: bad --port %s\n", argv[0], v);
                return -1;
            }
            a->port = (uint16_t)p;
        } else if (strcmp(flag, "--ca") == 0) {
            a->ca = v;
        } else if (strcmp(flag, "--cert") == 0) {
            a->cert = v;
        } else if (strcmp(flag, "--key") == 0) {
            a->key = v;
        } else if (strcmp(flag, "--template") == 0) {
            a->template_name = v;
        } else if (strcmp(flag, "--param") == 0) {
            const char *eq = strchr(v, '=');
            size_t klen = eq ? (size_t)(eq - v) : 0;
            if (eq == NULL || klen == 0 || klen >= sizeof a->param_buf[0]) {
                fprintf(stderr, "%s: --param wants KEY=VALUE, got %s\n", argv[0], v);
                return -1;
            }
            if (a->param_count == EXAMPLE_MAX_PARAMS) {
                fprintf(stderr, "%s: too many --param\n", argv[0]);
                return -1;
            }
            memcpy(a->param_buf[a->param_count], v, klen);
            a->param_buf[a->param_count][klen] = '\0';
            a->param_keys[a->param_count] = a->param_buf[a->param_count];
            a->param_values[a->param_count] = eq + 1;
            a->param_count++;
        } else if (strcmp(flag, "--out") == 0) {
            a->out_dir = v;
        } else if (strcmp(flag, "--format") == 0) {
            if (strcmp(v, "json") == 0) {
                a->format = FLEETPROV_FORMAT_JSON;
            } else if (strcmp(v, "cbor") == 0) {
                a->format = FLEETPROV_FORMAT_CBOR;
            } else {
                fprintf(stderr, "%s: unknown --format %s\n", argv[0], v);
                return -1;
            }
        } else if (strcmp(flag, "--mqtt") == 0) {
            if (strcmp(v, "5") == 0) {
                a->mqtt_version = FLEETPROV_MQTT_5;
            } else if (strcmp(v, "3.1.1") == 0) {
                a->mqtt_version = FLEETPROV_MQTT_3_1_1;
            } else {
                fprintf(stderr, "%s: unknown --mqtt %s (5 or 3.1.1)\n", argv[0], v);
                return -1;
            }
        } else if (strcmp(flag, "--method") == 0) {
            if (strcmp(v, "csr") == 0) {
                a->method = FLEETPROV_METHOD_CSR;
            } else if (strcmp(v, "keys") == 0) {
                a->method = FLEETPROV_METHOD_CREATE_KEYS;
            } else {
                fprintf(stderr, "%s: unknown --method %s\n", argv[0], v);
                return -1;
            }
        } else if (strcmp(flag, "--timeout") == 0 || strcmp(flag, "--wait") == 0) {
            char *end = NULL;
            errno = 0;
            unsigned long t = strtoul(v, &end, 10);
            if (errno != 0 || end == v || *end != '\0' || t == 0 || t > UINT32_MAX / 8) {
                fprintf(stderr, "%s: bad %s %s\n", argv[0], flag, v);
                return -1;
            }
            if (flag[2] == 't') {
                a->timeout_ms = (uint32_t)t;
            } else {
                a->wait_ms = (uint32_t)t;
            }
        } else if (strcmp(flag, "--client-id") == 0) {
            a->client_id = v;
        } else if (strcmp(flag, "--state-dir") == 0) {
            a->state_dir = v;
        } else if (strcmp(flag, "--retry") == 0) {
            /* MAX_ATTEMPTS,INITIAL_MS,MAX_MS; the library checks the values themselves. */
            const char *p = v;
            if (parse_u32(p, ',', &p, &a->retry_max_attempts) != 0 ||
                parse_u32(p + 1, ',', &p, &a->retry_initial_ms) != 0 ||
                parse_u32(p + 1, '\0', &p, &a->retry_max_ms) != 0) {
                fprintf(stderr, "%s: --retry wants MAX_ATTEMPTS,INITIAL_MS,MAX_MS, got %s\n",
                        argv[0], v);
                return -1;
            }
            a->have_retry = 1;
        } else {
            fprintf(stderr, "%s: unknown argument %s\n", argv[0], flag);
            example_usage(argv[0], extra, count);
            return -1;
        }
    }
    int claim_optional = (flags & EXAMPLE_CLAIM_OPTIONAL) != 0;
    int template_optional = (flags & EXAMPLE_TEMPLATE_OPTIONAL) != 0;
    const char *missing = !a->endpoint                                   ? "--endpoint"
                          : !a->cert && !claim_optional                  ? "--cert"
                          : !a->key && !claim_optional                   ? "--key"
                          : !a->template_name && !template_optional      ? "--template"
                          : (flags & EXAMPLE_REQUIRE_OUT) && !a->out_dir ? "--out"
                                                                         : NULL;
    if (missing) {
        fprintf(stderr, "%s: %s is required\n", argv[0], missing);
        example_usage(argv[0], extra, count);
        return -1;
    }
    return 0;
}

fleetprov_config *example_config(const struct example_args *a) {
    fleetprov_config *cfg = NULL;
    fleetprov_result r = fleetprov_config_new(&cfg);
    if (r != FLEETPROV_OK) {
        example_report_failure("fleetprov_config_new", r);
        return NULL;
    }
    const char *what = "fleetprov_config_set_endpoint";
    r = fleetprov_config_set_endpoint(cfg, a->endpoint, a->port);
    if (r == FLEETPROV_OK && a->ca) {
        what = "fleetprov_config_set_ca_file";
        r = fleetprov_config_set_ca_file(cfg, a->ca);
    }
    if (r == FLEETPROV_OK && (a->cert || a->key)) {
        what = "fleetprov_config_set_claim_files";
        r = fleetprov_config_set_claim_files(cfg, a->cert, a->key);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_template";
        r = fleetprov_config_set_template(cfg, a->template_name);
    }
    for (size_t i = 0; r == FLEETPROV_OK && i < a->param_count; i++) {
        what = "fleetprov_config_set_parameter";
        r = fleetprov_config_set_parameter(cfg, a->param_keys[i], a->param_values[i]);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_format";
        r = fleetprov_config_set_format(cfg, a->format);
    }
    if (r == FLEETPROV_OK && a->mqtt_version) {
        what = "fleetprov_config_set_mqtt_version";
        r = fleetprov_config_set_mqtt_version(cfg, a->mqtt_version);
    }
    if (r == FLEETPROV_OK && a->timeout_ms) {
        what = "fleetprov_config_set_timeouts";
        r = fleetprov_config_set_timeouts(cfg, a->timeout_ms, 6 * a->timeout_ms);
    }
    if (r == FLEETPROV_OK && a->client_id) {
        what = "fleetprov_config_set_client_id";
        r = fleetprov_config_set_client_id(cfg, a->client_id);
    }
    if (r == FLEETPROV_OK && a->state_dir) {
        what = "fleetprov_config_set_state_dir";
        r = fleetprov_config_set_state_dir(cfg, a->state_dir);
    }
    if (r == FLEETPROV_OK && a->have_retry) {
        what = "fleetprov_config_set_retry";
        r = fleetprov_config_set_retry(cfg, a->retry_max_attempts, a->retry_initial_ms,
                                       a->retry_max_ms);
    }
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        fleetprov_config_free(cfg);
        return NULL;
    }
    return cfg;
}

const char *example_step_name(fleetprov_step step) {
    switch (step) {
    case FLEETPROV_STEP_CONNECTING: return "connecting";
    case FLEETPROV_STEP_SUBSCRIBING: return "subscribing";
    case FLEETPROV_STEP_SUBSCRIBED: return "subscribed";
    case FLEETPROV_STEP_CREATING_CERTIFICATE: return "creating_certificate";
    case FLEETPROV_STEP_CERTIFICATE_CREATED: return "certificate_created";
    case FLEETPROV_STEP_REGISTERING: return "registering";
    case FLEETPROV_STEP_REGISTERED: return "registered";
    case FLEETPROV_STEP_VERIFYING: return "verifying";
    case FLEETPROV_STEP_VERIFIED: return "verified";
    case FLEETPROV_STEP_RESUMING: return "resuming";
    case FLEETPROV_STEP_RESTARTING: return "restarting";
    case FLEETPROV_STEP_RETRYING: return "retrying";
    case FLEETPROV_STEP_COMMITTED: return "committed";
    }
    return "unknown"; /* a step added by a newer library */
}

int example_stop_step_from_env(const char *prog, const char **step) {
    const char *v = getenv("FLEETPROV_EXAMPLE_STOP_AT");
    *step = NULL;
    if (v == NULL || *v == '\0') {
        return 0;
    }
    for (int s = FLEETPROV_STEP_CONNECTING; s <= FLEETPROV_STEP_COMMITTED; s++) {
        if (strcmp(v, example_step_name((fleetprov_step)s)) == 0) {
            *step = v;
            return 0;
        }
    }
    fprintf(stderr, "%s: FLEETPROV_EXAMPLE_STOP_AT=%s names no step\n", prog, v);
    return -1;
}

void example_stop_here(const char *prog, const char *what) {
    printf("stopped_at=%s\n", what);
    fflush(stdout);
    fprintf(stderr, "%s: stopped at %s (FLEETPROV_EXAMPLE_STOP_AT), waiting to be killed\n", prog,
            what);
    for (int i = 0; i < STOP_LIMIT_S; i++) {
        struct timespec second = {1, 0};
        nanosleep(&second, NULL); /* a signal cutting it short only shortens the bound */
    }
    fprintf(stderr, "%s: not killed within %d s at %s, exiting\n", prog, STOP_LIMIT_S, what);
    _exit(3);
}

void example_print_progress(const char *prefix, const fleetprov_progress *p) {
    const char *name = example_step_name(p->step);
    if (p->step == FLEETPROV_STEP_RETRYING) {
        /* The error is borrowed for the duration of the callback: print it now. */
        const fleetprov_error *e = p->error;
        const char *msg = e ? fleetprov_error_message(e) : NULL;
        const char *code = e ? fleetprov_result_name((int32_t)fleetprov_error_result(e)) : "?";
        fprintf(stderr, "%s step: %s (attempt %u failed, next in %llu ms): %s: %s\n", prefix, name,
                (unsigned)p->attempt, (unsigned long long)p->retry_in_ms, code,
                msg ? msg : "(no error)");
    } else {
        fprintf(stderr, "%s step: %s (attempt %u)\n", prefix, name, (unsigned)p->attempt);
    }
}

static void copy_str(char *dst, size_t cap, const char *src) {
    if (src == NULL) {
        src = "";
    }
    size_t n = strlen(src);
    if (n >= cap) {
        n = cap - 1;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
}

void example_copy_error(struct example_error *dst, fleetprov_result r, const fleetprov_error *e) {
    memset(dst, 0, sizeof *dst);
    dst->result = r;
    dst->mqtt_reason_code = -1;
    if (e != NULL) {
        dst->mqtt_reason_code = fleetprov_error_mqtt_reason_code(e);
        copy_str(dst->mqtt_reason_string, sizeof dst->mqtt_reason_string,
                 fleetprov_error_mqtt_reason_string(e));
        dst->result = fleetprov_error_result(e);
        dst->status_code = fleetprov_error_status_code(e);
        dst->retryable = fleetprov_error_is_retryable(e);
        copy_str(dst->message, sizeof dst->message, fleetprov_error_message(e));
        copy_str(dst->error_code, sizeof dst->error_code, fleetprov_error_code(e));
        copy_str(dst->service_message, sizeof dst->service_message,
                 fleetprov_error_service_message(e));
    }
}

void example_print_error(const char *what, const struct example_error *e) {
    const char *name = fleetprov_result_name((int32_t)e->result);
    fprintf(stderr, "%s failed: %s: %s\n", what, name, e->message);
    printf("result=%s\n", name);
    printf("error=%s\n", e->message);
    printf("retryable=%d\n", e->retryable);
    if (e->result == FLEETPROV_REJECTED) {
        printf("status_code=%u\n", (unsigned)e->status_code);
        printf("error_code=%s\n", e->error_code);
        printf("error_message=%s\n", e->service_message);
    }
    if (e->mqtt_reason_code >= 0) {
        printf("mqtt_reason_code=0x%02X\n", (unsigned)e->mqtt_reason_code);
        printf("mqtt_reason_string=%s\n", e->mqtt_reason_string);
    }
    fflush(stdout);
}

void example_report_failure(const char *what, fleetprov_result r) {
    struct example_error e;
    fleetprov_error *last = fleetprov_last_error();
    example_copy_error(&e, r, last);
    fleetprov_error_free(last);
    if (last == NULL) {
        /* Exercise the buffer flavour too: ask for the size, then copy. */
        size_t needed = 0;
        if (fleetprov_last_error_message(NULL, 0, &needed) == FLEETPROV_BUFFER_TOO_SMALL &&
            needed <= sizeof e.message) {
            fleetprov_last_error_message(e.message, sizeof e.message, NULL);
        }
    }
    e.result = r; /* the code the failing call returned */
    example_print_error(what, &e);
}

int example_make_private_dir(const char *dir) {
    if (mkdir(dir, 0700) != 0) {
        if (errno != EEXIST) {
            return -1;
        }
        struct stat st;
        if (stat(dir, &st) != 0) {
            return -1;
        }
        if (!S_ISDIR(st.st_mode)) {
            errno = ENOTDIR;
            return -1;
        }
    }
    /* mkdir's mode is filtered by the umask; set it exactly. */
    return chmod(dir, 0700);
}

int example_write_file(const char *dir, const char *name, const void *data, size_t len,
                       unsigned mode) {
    char path[4096], tmp[4096];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path ||
        snprintf(tmp, sizeof tmp, "%s/.%s.XXXXXX", dir, name) >= (int)sizeof tmp) {
        fprintf(stderr, "path too long: %s/%s\n", dir, name);
        return -1;
    }
    int fd = mkstemp(tmp); /* created 0600 */
    if (fd < 0) {
        fprintf(stderr, "%s: %s\n", tmp, strerror(errno));
        return -1;
    }
    const unsigned char *p = data;
    size_t left = len;
    int ok = fchmod(fd, (mode_t)mode) == 0;
    while (ok && left > 0) {
        ssize_t n = write(fd, p, left);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            ok = 0;
            break;
        }
        p += n;
        left -= (size_t)n;
    }
    ok = ok && fsync(fd) == 0;
    int saved = errno;
    if (close(fd) != 0 && ok) {
        ok = 0;
        saved = errno;
    }
    if (ok && rename(tmp, path) != 0) {
        ok = 0;
        saved = errno;
    }
    if (!ok) {
        unlink(tmp);
        fprintf(stderr, "%s: %s\n", path, strerror(saved));
        return -1;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}

void example_wipe(void *p, size_t len) {
    volatile unsigned char *v = p;
    while (len > 0) {
        v[--len] = 0;
    }
}
