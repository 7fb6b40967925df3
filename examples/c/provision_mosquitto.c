/* provision_mosquitto: firmware that owns its MQTT connection (libmosquitto) and lets the
 * library drive provisioning over it through the host-transport API (fleetprov_host_*).
 *
 *   provision_mosquitto --endpoint HOST --port N --ca ca.pem --cert claim.pem --key claim.key \
 *       --template DemoTemplate --param SerialNumber=ABC123 [--out DIR] [--state-dir DIR] \
 *       [--format json|cbor] [--method csr|keys] [--no-verify] [--client-id ID] \
 *       [--timeout MS] [--retry MAX,INITIAL_MS,MAX_MS]
 *
 * Prints thing_name=, certificate_id=, output_dir=, attempts=, resumed=0|1 and connects=N (the
 * connections the library asked for) on success (exit 0); the result name, the error text and
 * a rejection's fields on failure (exit 1). Steps and mosquitto's warnings go to stderr.
 *
 * The library opens no socket here: it asks through four callbacks (connect, disconnect,
 * subscribe, publish) and is told what the connection does (fleetprov_host_connected,
 * _connect_failed, _suback, _message, _disconnected) and when time passed (fleetprov_host_tick,
 * at fleetprov_host_wake_at at the latest). One thread, one loop:
 *
 *   until fleetprov_host_result() != FLEETPROV_IN_PROGRESS:
 *       carry out a connect/disconnect the library asked for
 *       mosquitto_loop(mosq, ms until fleetprov_host_wake_at(), 1)   (its callbacks report)
 *       fleetprov_host_tick(now)
 *
 * Connections: MQTT 3.1.1 over TLS (mosquitto_tls_set: the CA file, and the claim certificate
 * and key files, or the new certificate and key the library hands over, written for the
 * duration of mosquitto_connect() to a private temporary directory: 0700, files 0600, removed
 * as soon as libmosquitto has loaded them; a process killed in between leaves them there, in a
 * directory only its user can read). QoS 1 for subscriptions and publications; a clean
 * session each time. Each connection the library asks for is a new mosquitto object (the
 * client id can change: the new certificate connects as the thing). A connect or disconnect
 * asked for from inside a mosquitto callback (the library reacting to a message) is carried out
 * by the loop, after that callback returned: libmosquitto must not destroy an object from
 * inside its own callback.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>

#include "common.h"

#define KEEP_ALIVE_S 60
#define MAX_FILTERS 16
/* Bounds of the loop: the library's own deadline (the config's overall timeout, 60 s by
 * default) ends every flow long before these. */
#define MAX_ITERATIONS 200000
#define MAX_RUN_MS (10u * 60u * 1000u)

static uint64_t now_ms(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        return 0; /* cannot happen with CLOCK_MONOTONIC */
    }
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* State of the current mosquitto object, as far as the library is concerned. */
enum link_state {
    LINK_NONE,       /* no object */
    LINK_CONNECTING, /* connect started: CONNACK or a failure is reported */
    LINK_UP,         /* CONNACK seen: messages, SUBACKs and a drop are reported */
    LINK_DEAD,       /* its end was reported; the loop destroys it */
};

/* A connect or disconnect the library asked for, carried out by the loop. */
enum request_kind { REQ_NONE, REQ_DISCONNECT, REQ_CONNECT };

struct request {
    enum request_kind kind;
    bool claim;
    char *certificate_pem; /* copies: the library's pointers live for its callback only */
    char *private_key_pem; /* wiped when freed */
    char *client_id;
};

struct app {
    const struct example_args *args;
    fleetprov_host *host;
    struct mosquitto *mosq;
    enum link_state state;
    int subscribe_mid;    /* mid of the last SUBSCRIBE, to match its SUBACK */
    bool tls_error;       /* libmosquitto logged an OpenSSL error on the current connection */
    struct request req;   /* pending */
    unsigned connects;    /* connections the library asked for */
    fleetprov_result err; /* first failure of a fleetprov_host_* event call, or FLEETPROV_OK */
};

static void free_string(char **s, bool wipe) {
    if (*s != NULL && wipe) {
        example_wipe(*s, strlen(*s));
    }
    free(*s);
    *s = NULL;
}

static void request_clear(struct request *req) {
    free_string(&req->certificate_pem, false);
    free_string(&req->private_key_pem, true);
    free_string(&req->client_id, false);
    req->kind = REQ_NONE;
}

static char *dup_or_null(const char *s, bool *failed) {
    if (s == NULL) {
        return NULL;
    }
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d == NULL) {
        *failed = true;
        return NULL;
    }
    memcpy(d, s, n);
    return d;
}

/* Records the result of an event call (the first failure ends the loop). */
static void reported(struct app *app, const char *what, fleetprov_result r) {
    if (r != FLEETPROV_OK && app->err == FLEETPROV_OK) {
        example_report_failure(what, r);
        app->err = r;
    }
}

/* The current connection ended before (`connecting`) or after its CONNACK. */
static void link_ended(struct app *app, bool tls, const char *why) {
    bool connecting = app->state == LINK_CONNECTING;
    app->state = LINK_DEAD;
    fprintf(stderr, "provision_mosquitto: connection %s: %s%s\n",
            connecting ? "failed" : "lost", why, tls ? " (TLS)" : "");
    if (connecting) {
        reported(app, "fleetprov_host_connect_failed",
                 fleetprov_host_connect_failed(app->host, tls, now_ms()));
    } else {
        reported(app, "fleetprov_host_disconnected",
                 fleetprov_host_disconnected(app->host, now_ms()));
    }
}

/* ---- mosquitto's callbacks (inside mosquitto_loop / mosquitto_connect / _disconnect) ------- */

/* Events of an object other than the current one (an abandoned connection), or of one whose
 * end was already reported, are not the library's business. */
static bool current(const struct app *app, const struct mosquitto *mosq) {
    return mosq != NULL && mosq == app->mosq &&
           (app->state == LINK_CONNECTING || app->state == LINK_UP);
}

static void on_connect(struct mosquitto *mosq, void *obj, int rc) {
    struct app *app = obj;
    if (!current(app, mosq) || app->state != LINK_CONNECTING) {
        return;
    }
    if (rc != 0) {
        /* CONNACK refused (mosquitto then reports a disconnect, which is ignored). */
        link_ended(app, false, mosquitto_connack_string(rc));
        return;
    }
    app->state = LINK_UP;
    reported(app, "fleetprov_host_connected", fleetprov_host_connected(app->host, now_ms()));
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc) {
    struct app *app = obj;
    if (!current(app, mosq)) {
        return;
    }
    /* A handshake the server refused (the certificate not active) shows as MOSQ_ERR_TLS or, in
     * TLS 1.3 where the client finishes first, as an OpenSSL error logged while reading. */
    bool tls = rc == MOSQ_ERR_TLS || app->tls_error;
    link_ended(app, tls, rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int qos_count,
                         const int *granted_qos) {
    struct app *app = obj;
    if (!current(app, mosq) || mid != app->subscribe_mid || qos_count < 0) {
        return;
    }
    /* One entry per filter of the last SUBSCRIBE: the library asks for a handful (AWS IoT takes
     * at most 8 per SUBSCRIBE). */
    uint8_t codes[MAX_FILTERS];
    if (qos_count > MAX_FILTERS) {
        link_ended(app, false, "a SUBACK with more entries than filters");
        return;
    }
    for (int i = 0; i < qos_count; i++) {
        /* libmosquitto gives each return code as an int: the granted QoS, or 0x80. */
        codes[i] = granted_qos[i] >= 0 && granted_qos[i] <= 0xFF ? (uint8_t)granted_qos[i] : 0x80;
    }
    reported(app, "fleetprov_host_suback",
             fleetprov_host_suback(app->host, codes, (size_t)qos_count, now_ms()));
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg) {
    struct app *app = obj;
    if (!current(app, mosq) || app->state != LINK_UP || msg->payloadlen < 0) {
        return;
    }
    /* libmosquitto's topic is a C string; the library takes any topic as bytes and a length. */
    reported(app, "fleetprov_host_message",
             fleetprov_host_message(app->host, (const uint8_t *)msg->topic, strlen(msg->topic),
                                    msg->payload, (size_t)msg->payloadlen, now_ms()));
}

static void on_log(struct mosquitto *mosq, void *obj, int level, const char *line) {
    struct app *app = obj;
    if (strncmp(line, "OpenSSL Error", 13) == 0 && mosq == app->mosq) {
        app->tls_error = true;
    }
    if (level & (MOSQ_LOG_ERR | MOSQ_LOG_WARNING)) {
        fprintf(stderr, "provision_mosquitto: mosquitto: %s\n", line);
    }
}

/* ---- the library's callbacks (inside fleetprov_host_* calls) -------------------------------- */

/* The current connection is no longer the library's: ignore its events from now on. */
static void abandon(struct app *app) {
    if (app->state == LINK_CONNECTING || app->state == LINK_UP) {
        app->state = LINK_DEAD;
    }
}

static int32_t host_connect(void *userdata, const fleetprov_identity *id) {
    struct app *app = userdata;
    bool failed = false;
    request_clear(&app->req);
    abandon(app);
    app->connects++;
    app->req.claim = id->claim;
    if (!id->claim) {
        if (id->certificate_pem == NULL || id->private_key_pem == NULL) {
            /* An external key (CSR, signer) would be the host's own: not this example's case. */
            fprintf(stderr, "provision_mosquitto: no private key for the new certificate\n");
            return -1;
        }
        app->req.certificate_pem = dup_or_null(id->certificate_pem, &failed);
        app->req.private_key_pem = dup_or_null(id->private_key_pem, &failed);
    }
    app->req.client_id = dup_or_null(id->client_id, &failed);
    if (failed) {
        request_clear(&app->req);
        return -1; /* a failed connection attempt, reported by the library itself */
    }
    fprintf(stderr, "provision_mosquitto: asked to connect with the %s%s%s\n",
            id->claim ? "claim certificate" : "new certificate",
            (id->client_id && *id->client_id) ? " as " : "", id->client_id ? id->client_id : "");
    app->req.kind = REQ_CONNECT;
    return 0;
}

static void host_disconnect(void *userdata) {
    struct app *app = userdata;
    request_clear(&app->req);
    abandon(app);
    app->req.kind = REQ_DISCONNECT;
}

static int32_t host_subscribe(void *userdata, const char *const *filters, size_t count) {
    struct app *app = userdata;
    if (app->mosq == NULL || app->state != LINK_UP || count > MAX_FILTERS) {
        return -1;
    }
    /* libmosquitto's prototype lacks the inner const; it does not write to the filters. */
    int rc = mosquitto_subscribe_multiple(app->mosq, &app->subscribe_mid, (int)count,
                                          (char *const *)filters, 1, 0, NULL);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "provision_mosquitto: subscribe: %s\n", mosquitto_strerror(rc));
        return -1;
    }
    return 0;
}

static int32_t host_publish(void *userdata, const char *topic, const uint8_t *payload,
                            size_t len) {
    struct app *app = userdata;
    if (app->mosq == NULL || app->state != LINK_UP || len > INT_MAX) {
        return -1;
    }
    int rc = mosquitto_publish(app->mosq, NULL, topic, (int)len, payload, 1, false);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "provision_mosquitto: publish: %s\n", mosquitto_strerror(rc));
        return -1;
    }
    return 0;
}

/* ---- the loop's side: connections --------------------------------------------------------- */

/* Closes and destroys the current mosquitto object, reporting nothing (asked for, or its end
 * was reported already). */
static void drop_link(struct app *app) {
    struct mosquitto *mosq = app->mosq;
    if (mosq == NULL) {
        return;
    }
    app->mosq = NULL; /* callbacks during the disconnect below are ignored */
    app->state = LINK_NONE;
    int rc = mosquitto_disconnect(mosq);
    if (rc != MOSQ_ERR_SUCCESS && rc != MOSQ_ERR_NO_CONN) {
        fprintf(stderr, "provision_mosquitto: disconnect: %s\n", mosquitto_strerror(rc));
    }
    mosquitto_destroy(mosq);
}

/* The new certificate and key as files for mosquitto_tls_set: a private temporary directory
 * (0700) holding certificate.pem and private.key (0600). `dir` receives its path. */
static int write_identity(const struct request *req, char *dir, size_t cap) {
    const char *tmp = getenv("TMPDIR");
    if (tmp == NULL || *tmp == '\0') {
        tmp = "/tmp";
    }
    if (snprintf(dir, cap, "%s/fleetprov-mosquitto.XXXXXX", tmp) >= (int)cap) {
        fprintf(stderr, "provision_mosquitto: TMPDIR too long\n");
        return -1;
    }
    if (mkdtemp(dir) == NULL) { /* 0700 */
        fprintf(stderr, "provision_mosquitto: %s: %s\n", dir, strerror(errno));
        return -1;
    }
    if (example_write_file(dir, "certificate.pem", req->certificate_pem,
                           strlen(req->certificate_pem), 0600) != 0 ||
        example_write_file(dir, "private.key", req->private_key_pem,
                           strlen(req->private_key_pem), 0600) != 0) {
        return -1; /* the caller removes what was written */
    }
    return 0;
}

static void remove_identity(const char *dir) {
    char path[4096];
    static const char *const names[] = {"certificate.pem", "private.key"};
    for (size_t i = 0; i < 2; i++) {
        if (snprintf(path, sizeof path, "%s/%s", dir, names[i]) < (int)sizeof path &&
            unlink(path) != 0 && errno != ENOENT) {
            fprintf(stderr, "provision_mosquitto: %s: %s\n", path, strerror(errno));
        }
    }
    if (rmdir(dir) != 0) {
        fprintf(stderr, "provision_mosquitto: %s: %s\n", dir, strerror(errno));
    }
}

/* Opens the connection the library asked for. A failure is reported as a failed connect: TLS
 * when libmosquitto says so. */
static void open_link(struct app *app) {
    const struct example_args *a = app->args;
    const struct request *req = &app->req;
    char dir[4096] = "", cert_path[4200], key_path[4200];
    const char *cert = a->cert, *key = a->key;
    const char *id = (req->client_id && *req->client_id) ? req->client_id : a->client_id;
    int rc = MOSQ_ERR_NOMEM;
    const char *what = "mosquitto_new";
    app->state = LINK_CONNECTING; /* the library now waits for a CONNACK or a failure */
    app->tls_error = false;
    /* A new object for each connection: the client id may change (NULL: a random one). */
    struct mosquitto *mosq = mosquitto_new(id, true, app);
    if (mosq == NULL) {
        goto failed;
    }
    mosquitto_connect_callback_set(mosq, on_connect);
    mosquitto_disconnect_callback_set(mosq, on_disconnect);
    mosquitto_subscribe_callback_set(mosq, on_subscribe);
    mosquitto_message_callback_set(mosq, on_message);
    mosquitto_log_callback_set(mosq, on_log);
    what = "MQTT 3.1.1";
    rc = mosquitto_int_option(mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    if (rc == MOSQ_ERR_SUCCESS && a->ca == NULL) {
        what = "the system's CA certificates";
        rc = mosquitto_int_option(mosq, MOSQ_OPT_TLS_USE_OS_CERTS, 1);
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        goto failed;
    }
    if (!req->claim) {
        what = "writing the new certificate and key";
        rc = MOSQ_ERR_UNKNOWN;
        if (write_identity(req, dir, sizeof dir) != 0) {
            goto failed;
        }
        snprintf(cert_path, sizeof cert_path, "%s/certificate.pem", dir);
        snprintf(key_path, sizeof key_path, "%s/private.key", dir);
        cert = cert_path;
        key = key_path;
    }
    what = "mosquitto_tls_set";
    rc = mosquitto_tls_set(mosq, a->ca, NULL, cert, key, NULL);
    if (rc != MOSQ_ERR_SUCCESS) {
        goto failed;
    }
    app->mosq = mosq;
    what = "mosquitto_connect";
    /* Resolves and connects the socket (loopback here), loads the certificate and key and
     * starts the TLS handshake, which mosquitto_loop() continues. */
    rc = mosquitto_connect(mosq, a->endpoint, a->port, KEEP_ALIVE_S);
    if (dir[0] != '\0') {
        remove_identity(dir); /* loaded now (or never) */
        dir[0] = '\0';
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        goto failed;
    }
    return;
failed:
    if (dir[0] != '\0') {
        remove_identity(dir);
    }
    fprintf(stderr, "provision_mosquitto: %s: %s\n", what,
            rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
    if (app->state == LINK_CONNECTING) { /* not reported by a callback yet */
        link_ended(app, rc == MOSQ_ERR_TLS || app->tls_error, what);
    }
    if (app->mosq != mosq) {
        mosquitto_destroy(mosq); /* NULL-safe; the current one is dropped by the loop */
    }
}

/* Carries out what the library asked for since the last time. */
static void perform_request(struct app *app) {
    enum request_kind kind = app->req.kind;
    if (kind == REQ_NONE) {
        return;
    }
    app->req.kind = REQ_NONE;
    drop_link(app);
    if (kind == REQ_CONNECT) {
        open_link(app);
    }
    request_clear(&app->req);
}

/* ---- main --------------------------------------------------------------------------------- */

static void on_progress(void *userdata, const fleetprov_progress *progress) {
    example_print_progress(userdata, progress);
}

/* Runs the flow to its end; the result (or the failure) as fleetprov_host_result gives it. */
static fleetprov_result run(struct app *app, fleetprov_provisioned **out) {
    fleetprov_result r = fleetprov_host_start(app->host, now_ms());
    if (r != FLEETPROV_OK) {
        example_report_failure("fleetprov_host_start", r);
        return r;
    }
    uint64_t started = now_ms();
    for (long i = 0; i < MAX_ITERATIONS; i++) {
        /* A failed connect may make the library ask again at once (or to disconnect). */
        for (int k = 0; k < 8 && app->req.kind != REQ_NONE; k++) {
            perform_request(app);
        }
        if (app->mosq != NULL && app->state == LINK_DEAD) {
            drop_link(app);
        }
        if (app->err != FLEETPROV_OK) {
            return app->err;
        }
        r = fleetprov_host_result(app->host, out);
        if (r != FLEETPROV_IN_PROGRESS) {
            if (r != FLEETPROV_OK) {
                example_report_failure("provisioning", r);
            }
            return r;
        }
        uint64_t now = now_ms();
        if (now - started > MAX_RUN_MS) {
            break;
        }
        uint64_t wake = 0;
        reported(app, "fleetprov_host_wake_at", fleetprov_host_wake_at(app->host, &wake));
        int wait = wake <= now ? 0 : (wake - now > 1000 ? 1000 : (int)(wake - now));
        if (app->req.kind != REQ_NONE) {
            wait = 0; /* carry it out first */
        }
        if (wait > 0 && app->mosq != NULL) {
            /* Network and keep-alive; returns early when something arrives. */
            int rc = mosquitto_loop(app->mosq, wait, 1);
            if (rc != MOSQ_ERR_SUCCESS && current(app, app->mosq)) {
                /* Ended without a disconnect callback (e.g. MOSQ_ERR_NO_CONN). */
                link_ended(app, rc == MOSQ_ERR_TLS || app->tls_error,
                           rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
            }
        } else if (wait > 0) {
            /* No connection: only the library's timer (a pause before a retry) can end this. */
            if (poll(NULL, 0, wait) < 0 && errno != EINTR) {
                perror("poll");
                break;
            }
        }
        reported(app, "fleetprov_host_tick", fleetprov_host_tick(app->host, now_ms()));
    }
    fprintf(stderr, "provision_mosquitto: the flow did not end within the loop's bounds\n");
    printf("result=loop\nerror=the flow did not end within the loop's bounds\n");
    return FLEETPROV_TIMEOUT;
}

int main(int argc, char **argv) {
    struct example_args args;
    if (example_parse_args(argc, argv, &args, 0) != 0) {
        return 1;
    }
    int status = 1;
    struct app app;
    memset(&app, 0, sizeof app);
    app.args = &args;
    fleetprov_provisioned *p = NULL;
    int rc = mosquitto_lib_init();
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "provision_mosquitto: mosquitto_lib_init: %s\n", mosquitto_strerror(rc));
        return 1;
    }
    /* The claim files, endpoint and port are this program's (mosquitto's) business; the library
     * checks the claim pair once here and keys the resume journal by the endpoint. */
    fleetprov_config *cfg = example_config(&args);
    if (cfg == NULL) {
        goto out;
    }
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
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_progress_callback";
        r = fleetprov_config_set_progress_callback(cfg, on_progress,
                                                   (void *)"provision_mosquitto:", NULL);
    }
    const fleetprov_host_callbacks callbacks = {
        .size = sizeof(fleetprov_host_callbacks),
        .connect = host_connect,
        .disconnect = host_disconnect,
        .subscribe = host_subscribe,
        .publish = host_publish,
    };
    if (r == FLEETPROV_OK) {
        /* `app` outlives the host object: no userdata_free. */
        what = "fleetprov_host_new";
        r = fleetprov_host_new(cfg, &callbacks, &app, NULL, &app.host);
    }
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        goto out;
    }
    if (run(&app, &p) != FLEETPROV_OK) {
        goto out;
    }
    printf("thing_name=%s\n", fleetprov_provisioned_thing_name(p));
    printf("certificate_id=%s\n", fleetprov_provisioned_certificate_id(p));
    const char *dir = fleetprov_provisioned_output_dir(p);
    printf("output_dir=%s\n", dir ? dir : "");
    printf("attempts=%u\n", (unsigned)fleetprov_provisioned_attempts(p));
    printf("resumed=%d\n", fleetprov_provisioned_resumed(p) ? 1 : 0);
    printf("connects=%u\n", app.connects);
    status = 0;
out:
    drop_link(&app);
    request_clear(&app.req);
    fleetprov_host_free(app.host);
    fleetprov_provisioned_free(p);
    fleetprov_config_free(cfg);
    mosquitto_lib_cleanup();
    return status;
}
