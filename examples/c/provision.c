/* provision: the one-call flow (fleetprov_provision), with progress and log callbacks.
 *
 *   provision --endpoint HOST --port N --ca ca.pem --cert claim.pem --key claim.key \
 *       --template DemoTemplate --param SerialNumber=ABC123 [--out DIR] [--format json|cbor] \
 *       [--method csr|keys] [--no-verify]
 *
 * Prints thing_name=, certificate_id= and output_dir= on success (exit 0); the result name,
 * the error text and a rejection's fields on failure (exit 1). Steps and log lines go to stderr.
 */
#include <stdio.h>
#include <stdlib.h>

#include "common.h"

static const char *step_name(fleetprov_step step) {
    switch (step) {
    case FLEETPROV_STEP_CONNECTING: return "connecting";
    case FLEETPROV_STEP_SUBSCRIBING: return "subscribing";
    case FLEETPROV_STEP_SUBSCRIBED: return "subscribed";
    case FLEETPROV_STEP_CREATING_CERTIFICATE: return "creating certificate";
    case FLEETPROV_STEP_CERTIFICATE_CREATED: return "certificate created";
    case FLEETPROV_STEP_REGISTERING: return "registering";
    case FLEETPROV_STEP_REGISTERED: return "registered";
    case FLEETPROV_STEP_VERIFYING: return "verifying";
    case FLEETPROV_STEP_VERIFIED: return "verified";
    }
    return "?";
}

/* Userdata of the callbacks: a heap object released by the library through userdata_free,
 * to show the ownership rule (called once, when the last config using it is freed). */
struct reporter {
    const char *prefix;
    unsigned steps;
    unsigned lines;
};

/* Runs on the calling thread (blocking fleetprov_provision). */
static void on_progress(void *userdata, fleetprov_step step) {
    struct reporter *rep = userdata;
    rep->steps++;
    fprintf(stderr, "%s step: %s\n", rep->prefix, step_name(step));
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
    if (example_parse_args(argc, argv, &args, 0) != 0) {
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
        what = "fleetprov_provision";
        r = fleetprov_provision(cfg, &p);
    }
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        goto out;
    }
    fprintf(stderr, "provision: %u steps, %u log lines\n", rep->steps, rep->lines);
    printf("thing_name=%s\n", fleetprov_provisioned_thing_name(p));
    printf("certificate_id=%s\n", fleetprov_provisioned_certificate_id(p));
    const char *dir = fleetprov_provisioned_output_dir(p);
    printf("output_dir=%s\n", dir ? dir : "");
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
    return status;
}
