/* Shared helpers of the fleetprov C examples: command line, error reporting, credential files. */
#ifndef FLEETPROV_EXAMPLES_COMMON_H
#define FLEETPROV_EXAMPLES_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "fleetprov.h"

#define EXAMPLE_MAX_PARAMS 16

/* Command line shared by the examples:
 *   --endpoint HOST [--port N] --ca CA.pem --cert claim.pem --key claim.key --template NAME
 *   [--param K=V]... [--out DIR] [--format json|cbor] [--method csr|keys] [--timeout MS]
 *   [--client-id ID] [--no-verify] [--wait MS] [--state-dir DIR]
 *   [--retry MAX_ATTEMPTS,INITIAL_MS,MAX_MS]
 * --state-dir and --retry apply to the one-call flow (provision, provision_with_csr).
 * Strings point into argv. */
struct example_args {
    const char *endpoint;
    uint16_t port;
    const char *ca;
    const char *cert;
    const char *key;
    const char *template_name;
    const char *param_keys[EXAMPLE_MAX_PARAMS];
    const char *param_values[EXAMPLE_MAX_PARAMS];
    char param_buf[EXAMPLE_MAX_PARAMS][256];
    size_t param_count;
    const char *out_dir;
    int format; /* a fleetprov_format */
    int mqtt_version; /* a fleetprov_mqtt_version; 0: the library's default (MQTT 5) */
    int method; /* a fleetprov_method (provision only) */
    uint32_t timeout_ms;
    uint32_t wait_ms; /* provision_steps: bound on each completion wait (then cancel) */
    const char *client_id;
    int verify;
    const char *state_dir; /* resume journal directory (fleetprov_config_set_state_dir) */
    int have_retry;        /* --retry given: the three fields below are set */
    uint32_t retry_max_attempts;
    uint32_t retry_initial_ms;
    uint32_t retry_max_ms;
};

/* Parses argv; on error prints a message and the usage to stderr and returns -1. */
int example_parse_args(int argc, char **argv, struct example_args *args, int require_out);

/* An option one example takes besides the shared ones. */
struct example_option {
    const char *flag;       /* "--rotate" */
    const char *value_name; /* "DIR" for an option with a value; NULL for a switch */
    const char **value;     /* with a value: set to it (points into argv); NULL otherwise */
    int *given;             /* set to 1 when the option is present (may be NULL) */
};

#define EXAMPLE_REQUIRE_OUT 1u       /* --out is required */
#define EXAMPLE_CLAIM_OPTIONAL 2u    /* --cert and --key may be left out (the caller checks) */
#define EXAMPLE_TEMPLATE_OPTIONAL 4u /* --template may be left out (the caller checks) */

/* example_parse_args with `flags` (EXAMPLE_*) and `count` more options (listed in the usage);
 * the values of those not given are left as they were. */
int example_parse_args_with(int argc, char **argv, struct example_args *args, unsigned flags,
                            const struct example_option *extra, size_t count);

/* Prints the usage, with the `count` extra options, to stderr. */
void example_usage(const char *prog, const struct example_option *extra, size_t count);

/* Builds a config from the arguments (endpoint, CA, claim files when given, template,
 * parameters, format, timeouts, client id, state directory, retry policy). On failure reports
 * the error (see
 * example_report_failure) and returns NULL. */
fleetprov_config *example_config(const struct example_args *args);

/* The name of a step as the examples print it and FLEETPROV_EXAMPLE_STOP_AT names it:
 * "connecting", "creating_certificate", ..., "committed"; "unknown" for other values. */
const char *example_step_name(fleetprov_step step);

/* The test aid of the examples that can freeze at a step so that a test kills them there
 * (emu_test.py's crash cases): FLEETPROV_EXAMPLE_STOP_AT=STEP, a step name as
 * example_step_name() gives it. Sets *step to it (NULL when unset or empty) and returns 0, or
 * prints why and returns -1 when it names no step (a typo would never stop). */
int example_stop_step_from_env(const char *prog, const char **step);

/* Prints "stopped_at=WHAT" to stdout (flushed) and blocks, so that the process can be killed
 * at exactly this point; not killed within 120 s, it exits with 3. */
void example_stop_here(const char *prog, const char *what);

/* Prints one progress report to stderr: "<prefix> step: NAME (attempt N)", and for
 * FLEETPROV_STEP_RETRYING the pause and the failed attempt's error text. `progress` is the
 * callback's argument (valid only during the callback; nothing is kept). */
void example_print_progress(const char *prefix, const fleetprov_progress *progress);

/* Prints "result=NAME", the thread's last error text and, for FLEETPROV_REJECTED, statusCode,
 * errorCode and errorMessage (stdout), after "what failed" on stderr. */
void example_report_failure(const char *what, fleetprov_result r);

/* Same from an error object handed to a completion callback (or copied by the caller). */
struct example_error {
    fleetprov_result result;
    uint16_t status_code;
    int retryable;
    char message[1024];
    char error_code[128];
    char service_message[512];
    int32_t mqtt_reason_code; /* -1: none */
    char mqtt_reason_string[256];
};
void example_copy_error(struct example_error *dst, fleetprov_result r, const fleetprov_error *e);
void example_print_error(const char *what, const struct example_error *e);

/* Creates `dir` with mode 0700 (or tightens an existing directory to 0700). 0 or -1 (errno). */
int example_make_private_dir(const char *dir);

/* Writes `len` bytes to dir/name atomically (temporary file in dir, fsync, rename, fsync of the
 * directory), with exactly `mode`. 0 or -1 (message printed). */
int example_write_file(const char *dir, const char *name, const void *data, size_t len,
                       unsigned mode);

/* Overwrites `len` bytes at `p` with zeros in a way the compiler cannot drop (key copies). */
void example_wipe(void *p, size_t len);

#endif
