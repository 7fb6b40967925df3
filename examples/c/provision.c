/* provision: the one-call flow (fleetprov_provision), with progress and log callbacks, and
 * certificate rotation (fleetprov_rotate).
 *
 *   provision --endpoint HOST --port N --ca ca.pem --cert claim.pem --key claim.key \
 *       --template DemoTemplate --param SerialNumber=ABC123 [--out DIR] [--format json|cbor] \
 *       [--method csr|keys] [--no-verify] [--state-dir DIR] [--retry MAX,INITIAL_MS,MAX_MS]
 *   provision --rotate CREDENTIALS_DIR --endpoint HOST --port N --ca ca.pem \
 *       --template RotationTemplate --param ThingName=demo-ABC123 [--out DIR] [...]
 *
 * Prints thing_name=, certificate_id=, output_dir=, attempts= and resumed=0|1 on success
 * (exit 0); the result name, the error text and a rejection's fields on failure (exit 1).
 * Steps (with the attempt, and for a retry the pause and the error) and log lines go to stderr.
 *
 * --state-dir DIR keeps the library's resume journal: run again after a crash or a failure,
 * provision takes up the certificate an earlier run created (resumed=1) instead of making
 * another. With --out, a device already provisioned by an earlier run (DIR of --out holds a
 * complete credential set and no certificate is pending in the state directory) is not
 * provisioned again: the library returns that set without connecting, and provision prints
 * already_provisioned=1 with the same lines, as firmware would at boot. --reprovision makes a
 * new certificate anyway.
 *
 * Ctrl-C (SIGINT) or SIGTERM cancels a running provisioning through the library's
 * async-signal-safe cancellation switch: it stops at the next step with FLEETPROV_CANCELLED and
 * keeps the journal, so running the same command again resumes.
 *
 * --rotate CREDENTIALS_DIR rotates the certificate of a provisioned device instead: the library
 * connects with CREDENTIALS_DIR's certificate.pem, private.key and device.json (as an earlier
 * run with --out DIR wrote them; no claim certificate is needed, --cert and --key may be left
 * out), creates a new certificate through the given (rotation) template, connects with it, and
 * only then replaces the three files (in --out DIR instead, if given). A failed rotation leaves
 * them as they were. Prints rotated=1 and the same lines as a provisioning.
 *
 * Test aid: with FLEETPROV_EXAMPLE_STOP_AT=STEP in the environment (a step name as printed:
 * connecting, subscribing, subscribed, creating_certificate, certificate_created,
 * registering, registered, verifying, verified, resuming, restarting, retrying, committed),
 * the progress callback, on reaching that step, prints "stopped_at=STEP" to stdout, flushes,
 * and blocks there, inside the library's flow, so that a test can kill the process at exactly
 * that point (examples/c/emu_test.py --case crash). Not killed within 120 s, it exits with 3.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* Userdata of the callbacks: a heap object released by the library through userdata_free,
 * to show the ownership rule (called once, when the last config using it is freed). */
struct reporter {
    const char *prefix;
    const char *stop_at; /* FLEETPROV_EXAMPLE_STOP_AT, or NULL */
    unsigned steps;
    unsigned lines;
};

/* Runs on the calling thread (blocking fleetprov_provision). `progress` and the error it may
 * point to are valid only during the call. */
static void on_progress(void *userdata, const fleetprov_progress *progress) {
    struct reporter *rep = userdata;
    rep->steps++;
    example_print_progress(rep->prefix, progress);
    const char *name = example_step_name(progress->step);
    if (rep->stop_at != NULL && strcmp(rep->stop_at, name) == 0) {
        example_stop_here("provision", name); /* the test aid (see above) */
    }
}

/* Set before the handlers are installed, freed after they are restored. */
static fleetprov_cancel *cancel_switch;

static void on_signal(int sig) {
    (void)sig;
    fleetprov_cancel_trigger(cancel_switch); /* async-signal-safe */
}

static void on_log(void *userdata, fleetprov_log_level level, const char *message, size_t len) {
    struct reporter *rep = userdata;
    static const char *const levels[] = {"?", "ERROR", "WARN", "INFO", "DEBUG"};
    rep->lines++;
    fprintf(stderr, "%s log %s: %.*s\n", rep->prefix,
            (level >= 1 && level <= 4) ? levels[level] : "?", (int)len, message);
}

static void free_reporter(void *userdata) {
    free(userdata);
}

int main(int argc, char **argv) {
    struct example_args args;
    const char *stop_at = NULL;
    const char *rotate_dir = NULL;
    int reprovision = 0;
    const struct example_option options[] = {
        {"--rotate", "CREDENTIALS_DIR", &rotate_dir, NULL},
        {"--reprovision", NULL, NULL, &reprovision},
    };
    size_t n_options = sizeof options / sizeof options[0];
    if (example_parse_args_with(argc, argv, &args, EXAMPLE_CLAIM_OPTIONAL, options, n_options) !=
            0 ||
        example_stop_step_from_env(argv[0], &stop_at) != 0) {
        return 1;
    }
    if (rotate_dir == NULL && (args.cert == NULL || args.key == NULL)) {
        /* Provisioning connects with the claim certificate; a rotation does not need it. */
        fprintf(stderr, "%s: %s is required\n", argv[0], args.cert == NULL ? "--cert" : "--key");
        example_usage(argv[0], options, n_options);
        return 1;
    }
    fleetprov_config *cfg = example_config(&args);
    if (cfg == NULL) {
        return 1;
    }
    int status = 1;
    fleetprov_provisioned *p = NULL;
    const char *what = "fleetprov_config_set_method";
    fleetprov_result r = fleetprov_config_set_method(cfg, args.method);
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_verify";
        r = fleetprov_config_set_verify(cfg, args.verify != 0);
    }
    if (r == FLEETPROV_OK && args.out_dir) {
        what = "fleetprov_config_set_output_dir";
        r = fleetprov_config_set_output_dir(cfg, args.out_dir);
    }
    /* One reporter shared by both callbacks: each registration takes its own reference, so
     * only one of them gets the userdata_free (two would free twice). */
    struct reporter *rep = calloc(1, sizeof *rep);
    if (rep == NULL) {
        fprintf(stderr, "out of memory\n");
        goto out;
    }
    rep->prefix = "provision:";
    rep->stop_at = stop_at;
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_progress_callback";
        r = fleetprov_config_set_progress_callback(cfg, on_progress, rep, free_reporter);
    } else {
        free(rep);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_log_callback";
        r = fleetprov_config_set_log_callback(cfg, on_log, rep, NULL, FLEETPROV_LOG_DEBUG);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_reprovision";
        r = fleetprov_config_set_reprovision(cfg, reprovision != 0);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_cancel_new";
        r = fleetprov_cancel_new(&cancel_switch);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_cancel";
        r = fleetprov_config_set_cancel(cfg, cancel_switch);
    }
    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    if (r == FLEETPROV_OK && rotate_dir != NULL) {
        what = "fleetprov_rotate";
        r = fleetprov_rotate(cfg, rotate_dir, &p);
    } else if (r == FLEETPROV_OK) {
        what = "fleetprov_provision";
        r = fleetprov_provision(cfg, &p);
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (r == FLEETPROV_CANCELLED) {
        fprintf(stderr, "provision: interrupted; the journal (with --state-dir) is kept: run the "
                        "same command again to resume\n");
    }
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        goto out;
    }
    fprintf(stderr, "provision: %u steps, %u log lines\n", rep->steps, rep->lines);
    if (rotate_dir != NULL) {
        printf("rotated=1\n");
    }
    if (fleetprov_provisioned_already_provisioned(p)) {
        fprintf(stderr, "provision: %s holds the credentials of an earlier run; nothing to do\n",
                fleetprov_provisioned_output_dir(p));
        printf("already_provisioned=1\n");
    }
    printf("thing_name=%s\n", fleetprov_provisioned_thing_name(p));
    printf("certificate_id=%s\n", fleetprov_provisioned_certificate_id(p));
    const char *dir = fleetprov_provisioned_output_dir(p);
    printf("output_dir=%s\n", dir ? dir : "");
    printf("attempts=%u\n", (unsigned)fleetprov_provisioned_attempts(p));
    printf("resumed=%d\n", fleetprov_provisioned_resumed(p) ? 1 : 0);
    size_t n = fleetprov_provisioned_config_count(p);
    for (size_t i = 0; i < n; i++) {
        const char *k = NULL, *v = NULL;
        if (fleetprov_provisioned_config_entry(p, i, &k, &v) == FLEETPROV_OK) {
            printf("device_config.%s=%s\n", k, v);
        }
    }
    status = 0;
out:
    fleetprov_provisioned_free(p);
    fleetprov_config_free(cfg); /* releases `rep` through free_reporter */
    fleetprov_cancel_free(cancel_switch);
    return status;
}
