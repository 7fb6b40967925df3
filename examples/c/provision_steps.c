/* provision_steps: step by step with completion callbacks.
 *
 *   provision_steps --endpoint HOST --port N --ca ca.pem --cert claim.pem --key claim.key \
 *       --template DemoTemplate --param SerialNumber=ABC123 --out DIR [--format json|cbor]
 *
 * fleetprov_client_new, then CreateKeysAndCertificate and RegisterThing, each started with its
 * _async function and waited for with a mutex + condition variable (bounded wait; on timeout the
 * operation is cancelled). The program writes certificate.pem (0644) and private.key (0600)
 * into DIR (0700) itself.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "common.h"

/* One pending completion. Lives on main's stack: fleetprov_client_free() (and the next _async
 * call on the client) joins the worker, so the callback and userdata_free are over before it
 * goes out of scope. */
struct completion {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int done;
    int released; /* userdata_free calls: must end up 1 */
    fleetprov_result result;
    struct example_error error;
    fleetprov_certificate *certificate;   /* owned once received */
    fleetprov_registration *registration; /* owned once received */
};

static int completion_init(struct completion *c) {
    memset(c, 0, sizeof *c);
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) {
        return -1;
    }
    /* Deadlines on the monotonic clock: immune to wall-clock jumps. */
    int rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0) {
        rc = pthread_cond_init(&c->cond, &attr);
    }
    pthread_condattr_destroy(&attr);
    if (rc != 0) {
        return -1;
    }
    if (pthread_mutex_init(&c->lock, NULL) != 0) {
        pthread_cond_destroy(&c->cond);
        return -1;
    }
    return 0;
}

static void completion_destroy(struct completion *c) {
    fleetprov_certificate_free(c->certificate);
    fleetprov_registration_free(c->registration);
    pthread_cond_destroy(&c->cond);
    pthread_mutex_destroy(&c->lock);
}

/* Called by a worker thread: record the outcome, then wake main. `error` is only valid during
 * the call, so its fields are copied. */
static void finish(struct completion *c, fleetprov_result result, fleetprov_certificate *cert,
                   fleetprov_registration *reg, const fleetprov_error *error) {
    pthread_mutex_lock(&c->lock);
    c->result = result;
    c->certificate = cert;
    c->registration = reg;
    if (result != FLEETPROV_OK) {
        example_copy_error(&c->error, result, error);
    }
    c->done = 1;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static void on_certificate(void *userdata, fleetprov_result result,
                           fleetprov_certificate *certificate, const fleetprov_error *error) {
    finish(userdata, result, certificate, NULL, error);
}

static void on_registration(void *userdata, fleetprov_result result,
                            fleetprov_registration *registration, const fleetprov_error *error) {
    finish(userdata, result, NULL, registration, error);
}

static void on_release(void *userdata) {
    struct completion *c = userdata;
    pthread_mutex_lock(&c->lock);
    c->released++;
    pthread_mutex_unlock(&c->lock);
}

/* Waits up to `ms` for the completion; on timeout cancels the client's operation and waits
 * (bounded again) for the callback that reports it. 0 when the callback ran. */
static int wait_for(struct completion *c, fleetprov_client *client, unsigned ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += ms / 1000;
    deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    int cancelled = 0;
    pthread_mutex_lock(&c->lock);
    while (!c->done) {
        int rc = pthread_cond_timedwait(&c->cond, &c->lock, &deadline);
        if (rc == ETIMEDOUT && !c->done) {
            if (cancelled) {
                break;
            }
            fprintf(stderr, "provision_steps: no completion after %u ms, cancelling\n", ms);
            fleetprov_client_cancel(client); /* thread-safe; the callback reports CANCELLED */
            cancelled = 1;
            deadline.tv_sec += 5;
        }
    }
    int done = c->done;
    pthread_mutex_unlock(&c->lock);
    return done ? 0 : -1;
}

int main(int argc, char **argv) {
    struct example_args args;
    if (example_parse_args(argc, argv, &args, 1) != 0) {
        return 1;
    }
    if (args.state_dir != NULL || args.have_retry) {
        /* The resume journal and retries belong to the one-call flow; step by step, the caller
         * keeps the certificate and decides what to retry. */
        fprintf(stderr, "%s: --state-dir and --retry apply to the one-call flow only\n", argv[0]);
        return 1;
    }
    fleetprov_config *cfg = example_config(&args);
    if (cfg == NULL) {
        return 1;
    }
    /* Generous bound on each wait: the library's own per-step timeouts fire first. */
    unsigned wait_ms = args.wait_ms ? args.wait_ms : args.timeout_ms ? 4 * args.timeout_ms : 60000;
    int status = 1;
    int have_create = 0, have_register = 0;
    struct completion create, reg;
    fleetprov_client *client = NULL;
    if (completion_init(&create) != 0) {
        fprintf(stderr, "provision_steps: cannot set up a condition variable\n");
        fleetprov_config_free(cfg);
        return 1;
    }
    have_create = 1;
    if (completion_init(&reg) != 0) {
        fprintf(stderr, "provision_steps: cannot set up a condition variable\n");
        goto out;
    }
    have_register = 1;

    fleetprov_result r = fleetprov_client_new(cfg, &client);
    /* The client copied what it needs. */
    fleetprov_config_free(cfg);
    cfg = NULL;
    if (r != FLEETPROV_OK) {
        example_report_failure("fleetprov_client_new", r);
        goto out;
    }

    fprintf(stderr, "provision_steps: CreateKeysAndCertificate\n");
    r = fleetprov_client_create_keys_and_certificate_async(client, on_certificate, &create,
                                                            on_release);
    if (r != FLEETPROV_OK) {
        /* Not started: the library already called on_release. */
        example_report_failure("fleetprov_client_create_keys_and_certificate_async", r);
        goto out;
    }
    if (wait_for(&create, client, wait_ms) != 0) {
        fprintf(stderr, "provision_steps: CreateKeysAndCertificate never completed\n");
        goto out;
    }
    if (create.result != FLEETPROV_OK) {
        example_print_error("CreateKeysAndCertificate", &create.error);
        goto out;
    }
    const fleetprov_certificate *cert = create.certificate;
    fprintf(stderr, "provision_steps: certificate %s\n", fleetprov_certificate_id(cert));

    fprintf(stderr, "provision_steps: RegisterThing\n");
    r = fleetprov_client_register_thing_async(client, cert, NULL /* the config's template */,
                                              on_registration, &reg, on_release);
    if (r != FLEETPROV_OK) {
        example_report_failure("fleetprov_client_register_thing_async", r);
        goto out;
    }
    if (wait_for(&reg, client, wait_ms) != 0) {
        fprintf(stderr, "provision_steps: RegisterThing never completed\n");
        goto out;
    }
    if (reg.result != FLEETPROV_OK) {
        example_print_error("RegisterThing", &reg.error);
        goto out;
    }

    const char *cert_pem = fleetprov_certificate_pem(cert);
    const char *key_pem = fleetprov_certificate_private_key(cert);
    if (key_pem == NULL) {
        fprintf(stderr, "provision_steps: CreateKeysAndCertificate returned no private key\n");
        goto out;
    }
    if (example_make_private_dir(args.out_dir) != 0) {
        perror(args.out_dir);
        printf("result=storage\nerror=cannot create %s\n", args.out_dir);
        goto out;
    }
    /* Key first: a certificate without its key is useless, the reverse is retried. */
    if (example_write_file(args.out_dir, "private.key", key_pem, strlen(key_pem), 0600) != 0 ||
        example_write_file(args.out_dir, "certificate.pem", cert_pem, strlen(cert_pem), 0644) !=
            0) {
        printf("result=storage\nerror=cannot write the credentials to %s\n", args.out_dir);
        goto out;
    }
    printf("thing_name=%s\n", fleetprov_registration_thing_name(reg.registration));
    printf("certificate_id=%s\n", fleetprov_certificate_id(cert));
    printf("output_dir=%s\n", args.out_dir);
    size_t n = fleetprov_registration_config_count(reg.registration);
    for (size_t i = 0; i < n; i++) {
        const char *k = NULL, *v = NULL;
        if (fleetprov_registration_config_entry(reg.registration, i, &k, &v) == FLEETPROV_OK) {
            printf("device_config.%s=%s\n", k, v);
        }
    }
    status = 0;
out:
    /* Joins the worker: afterwards no callback or userdata_free can touch create/reg. */
    fleetprov_client_free(client);
    fleetprov_config_free(cfg);
    if (have_create) {
        if (create.done && create.released != 1) {
            fprintf(stderr, "provision_steps: userdata_free called %d times\n", create.released);
            status = 1;
        }
        completion_destroy(&create);
    }
    if (have_register) {
        if (reg.done && reg.released != 1) {
            fprintf(stderr, "provision_steps: userdata_free called %d times\n", reg.released);
            status = 1;
        }
        completion_destroy(&reg);
    }
    return status;
}
