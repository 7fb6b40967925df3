/* The C API's contracts, exercised the way firmware drives them: SUBACK return codes as bytes,
 * callbacks that call back into the library (blocking calls, frees, new operations), several
 * threads waiting for one operation, the last-error buffer, and (with a library built with the
 * cargo feature test-panics) what a panic inside the library turns into.
 *
 *   contracts CASE        runs one case; exit 0 when it held, 1 (with a message) when not.
 *
 * No server is needed: the cases that open a connection aim at a loopback port that is bound but
 * not listening, so every connection is refused at once. ctest runs each case plain, under
 * AddressSanitizer + UBSan, under valgrind and under ThreadSanitizer (tests/c/CMakeLists.txt).
 */
#include <fleetprov.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* A self-signed P-256 certificate and its key, made for these tests only (they never reach a
 * server: every connection is refused). */
static const char CERT_PEM[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBuzCCAWGgAwIBAgIUIyBz591R/7Rw9ezUMujUIfueXqMwCgYIKoZIzj0EAwIw\n"
    "MjEwMC4GA1UEAwwnZmxlZXRwcm92IGNvbnRyYWN0IHRlc3RzIChub3QgYSBzZWNy\n"
    "ZXQpMCAXDTI2MTIwMjA0Mjc0MloYDzIxMjYxMTA4MDQyNzQyWjAyMTAwLgYDVQQD\n"
    "DCdmbGVldHByb3YgY29udHJhY3QgdGVzdHMgKG5vdCBhIHNlY3JldCkwWTATBgcq\n"
    "hkjOPQIBBggqhkjOPQMBBwNCAAQLJ36t9RHTiHdWRq3oD2mzZ9tDzphCpz1jxzaX\n"
    "Na5YtNO9KXQ4hturKd2kGh9gOprVgPFx89CuJD86z8D0I32Ro1MwUTAdBgNVHQ4E\n"
    "FgQUhx6ncj5rbgbFKqCuG4huTaUbbR8wHwYDVR0jBBgwFoAUhx6ncj5rbgbFKqCu\n"
    "G4huTaUbbR8wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEApppq\n"
    "Ng7d6tEP35JThqqIvdUxx30PRxT6RDygReIEppwCIGNTRdhW3YfhQdIDu3/YyGd7\n"
    "cc8roUv/Y531bgzCKRDG\n"
    "-----END CERTIFICATE-----\n";
static const char KEY_PEM[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgTwG2qCpmHlPckx1D\n"
    "0prtOvYGg5Mdl6E6zRYGLPsi3VGhRANCAAQLJ36t9RHTiHdWRq3oD2mzZ9tDzphC\n"
    "pz1jxzaXNa5YtNO9KXQ4hturKd2kGh9gOprVgPFx89CuJD86z8D0I32R\n"
    "-----END PRIVATE KEY-----\n";

static int failures;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);           \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

#define CHECK_RESULT(call, expected)                                                           \
    do {                                                                                       \
        fleetprov_result r_ = (call);                                                          \
        if (r_ != (expected)) {                                                                \
            char m_[512] = "";                                                                 \
            fleetprov_last_error_message(m_, sizeof m_, NULL);                                 \
            fprintf(stderr, "%s:%d: %s gave %s, expected %s (%s)\n", __FILE__, __LINE__,       \
                    #call, fleetprov_result_name(r_), fleetprov_result_name(expected), m_);    \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

/* ---------------------------------------------------------------------------------------- */
/* A loopback port that refuses connections: bound, never listening. */

static int refusing_socket = -1;

static uint16_t refusing_port(void) {
    if (refusing_socket < 0) {
        refusing_socket = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (refusing_socket < 0 || bind(refusing_socket, (struct sockaddr *)&a, sizeof a) != 0) {
            perror("bind");
            exit(2);
        }
    }
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    getsockname(refusing_socket, (struct sockaddr *)&a, &len);
    return ntohs(a.sin_port);
}

/* A config for the refusing port: claim credentials, a template, `attempts` attempts 50 ms apart. */
static fleetprov_config *refused_config(uint32_t attempts) {
    fleetprov_config *c = NULL;
    CHECK_RESULT(fleetprov_config_new(&c), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_endpoint(c, "127.0.0.1", refusing_port()), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_ca_pem(c, CERT_PEM), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_claim_pem(c, CERT_PEM, KEY_PEM), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_template(c, "DemoTemplate"), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_retry(c, attempts, 50, 50), FLEETPROV_OK);
    return c;
}

/* ---------------------------------------------------------------------------------------- */
/* Host transport: an in-memory MQTT stack that records what the flow asks. */

struct fake_stack {
    int connects, subscribes, publishes, disconnects;
    size_t filters;
    fleetprov_host *host;
    int free_host_in_connect;      /* fleetprov_host_free() from the connect callback */
    int provision_in_connect;      /* fleetprov_provision() from the connect callback */
    fleetprov_result provision_r;  /* ... and what it returned */
    atomic_int freed;              /* userdata_free calls */
    char last_topic[256];          /* the topic of the last publish */
};

static void fake_free(void *userdata) {
    atomic_fetch_add(&((struct fake_stack *)userdata)->freed, 1);
}

static int32_t fake_connect(void *userdata, const fleetprov_identity *identity) {
    struct fake_stack *s = userdata;
    (void)identity;
    s->connects++;
    if (s->provision_in_connect) {
        fleetprov_config *other = refused_config(1);
        fleetprov_provisioned *p = NULL;
        s->provision_r = fleetprov_provision(other, &p);
        CHECK(p == NULL);
        fleetprov_config_free(other);
    }
    if (s->free_host_in_connect) {
        fleetprov_host_free(s->host);
    }
    return 0;
}

static void fake_disconnect(void *userdata) {
    ((struct fake_stack *)userdata)->disconnects++;
}

static int32_t fake_subscribe(void *userdata, const char *const *filters, size_t count) {
    struct fake_stack *s = userdata;
    (void)filters;
    s->subscribes++;
    s->filters = count;
    return 0;
}

static int32_t fake_publish(void *userdata, const char *topic, const uint8_t *payload, size_t len) {
    struct fake_stack *s = userdata;
    (void)payload;
    (void)len;
    s->publishes++;
    snprintf(s->last_topic, sizeof s->last_topic, "%s", topic);
    return 0;
}

static const fleetprov_host_callbacks FAKE = {
    .size = sizeof(fleetprov_host_callbacks),
    .connect = fake_connect,
    .disconnect = fake_disconnect,
    .subscribe = fake_subscribe,
    .publish = fake_publish,
};

static fleetprov_host *fake_host(struct fake_stack *s) {
    fleetprov_config *c = NULL;
    CHECK_RESULT(fleetprov_config_new(&c), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_template(c, "DemoTemplate"), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_retry(c, 1, 50, 50), FLEETPROV_OK);
    fleetprov_host *h = NULL;
    CHECK_RESULT(fleetprov_host_new(c, &FAKE, s, fake_free, &h), FLEETPROV_OK);
    fleetprov_config_free(c);
    s->host = h;
    return h;
}

/* fleetprov_host_suback takes the return codes as bytes: below 0x80 granted. */
static void case_suback_codes(void) {
    static const struct {
        uint8_t codes[4];
        int granted;
    } rows[] = {
        {{0x00, 0x01, 0x02, 0x01}, 1},
        {{0x01, 0x01, 0x01, 0x7F}, 1},
        {{0x01, 0x80, 0x01, 0x01}, 0},
        {{0x01, 0x01, 0x01, 0x87}, 0}, /* MQTT 5: not authorized */
        {{0xFF, 0x01, 0x01, 0x01}, 0},
        {{0x02, 0x02, 0x02, 0x97}, 0}, /* MQTT 5: quota exceeded */
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        struct fake_stack s;
        memset(&s, 0, sizeof s);
        fleetprov_host *h = fake_host(&s);
        CHECK_RESULT(fleetprov_host_start(h, 0), FLEETPROV_OK);
        CHECK_RESULT(fleetprov_host_connected(h, 1), FLEETPROV_OK);
        CHECK(s.subscribes == 1 && s.filters == 4);
        CHECK_RESULT(fleetprov_host_suback(h, rows[i].codes, 4, 2), FLEETPROV_OK);
        fleetprov_provisioned *p = NULL;
        if (rows[i].granted) {
            CHECK(s.publishes == 1);
            CHECK_RESULT(fleetprov_host_result(h, &p), FLEETPROV_IN_PROGRESS);
        } else {
            CHECK(s.publishes == 0);
            CHECK_RESULT(fleetprov_host_result(h, &p), FLEETPROV_SUBSCRIBE_FAILED);
        }
        CHECK(p == NULL);
        fleetprov_host_free(h);
    }
    /* NULL codes with a count is refused; with 0 it is an empty SUBACK. */
    struct fake_stack s;
    memset(&s, 0, sizeof s);
    fleetprov_host *h = fake_host(&s);
    CHECK_RESULT(fleetprov_host_suback(h, NULL, 2, 0), FLEETPROV_INVALID_ARGUMENT);
    CHECK_RESULT(fleetprov_host_suback(h, NULL, 0, 0), FLEETPROV_OK);
    fleetprov_host_free(h);
}

/* fleetprov_host_callbacks.size: smaller than the struct is refused (the userdata released at
 * once), larger (a later header's struct) is accepted. */
static void case_host_callbacks_size(void) {
    fleetprov_config *c = NULL;
    CHECK_RESULT(fleetprov_config_new(&c), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_template(c, "DemoTemplate"), FLEETPROV_OK);
    static const size_t too_small[] = {0, sizeof(size_t), sizeof(fleetprov_host_callbacks) - 1};
    struct fake_stack s;
    memset(&s, 0, sizeof s);
    for (size_t i = 0; i < sizeof too_small / sizeof too_small[0]; i++) {
        fleetprov_host_callbacks cb = FAKE;
        cb.size = too_small[i];
        fleetprov_host *h = NULL;
        CHECK_RESULT(fleetprov_host_new(c, &cb, &s, fake_free, &h), FLEETPROV_INVALID_ARGUMENT);
        CHECK(h == NULL);
        CHECK(atomic_load(&s.freed) == (int)i + 1);
        char message[256] = "";
        fleetprov_last_error_message(message, sizeof message, NULL);
        CHECK(strstr(message, "set it to sizeof(fleetprov_host_callbacks)") != NULL);
    }
    struct {
        fleetprov_host_callbacks known;
        void (*added[2])(void);
    } later;
    memset(&later, 0xA5, sizeof later); /* what this version does not know is never read */
    later.known = FAKE;
    later.known.size = sizeof later;
    fleetprov_host *h = NULL;
    CHECK_RESULT(fleetprov_host_new(c, &later.known, &s, fake_free, &h), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_host_start(h, 0), FLEETPROV_OK);
    CHECK(s.connects == 1);
    fleetprov_host_free(h);
    CHECK(atomic_load(&s.freed) == 4);
    fleetprov_config_free(c);
}

/* fleetprov_host_message takes the topic as bytes and a length: no NUL is needed (the reply's
 * topic comes in a buffer of exactly its length, so ASan and valgrind would see a read past it),
 * a NUL inside and bytes that are not UTF-8 make a topic of no interest (ignored, not an error),
 * NULL with a length is refused. */
static void case_host_topic_bytes(void) {
    struct fake_stack s;
    memset(&s, 0, sizeof s);
    fleetprov_host *h = fake_host(&s);
    CHECK_RESULT(fleetprov_host_start(h, 0), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_host_connected(h, 1), FLEETPROV_OK);
    static const uint8_t granted[4] = {1, 1, 1, 1};
    CHECK_RESULT(fleetprov_host_suback(h, granted, 4, 2), FLEETPROV_OK);
    CHECK(s.publishes == 1);
    char reply[300];
    snprintf(reply, sizeof reply, "%s/accepted", s.last_topic);
    size_t n = strlen(reply);
    static const uint8_t body[] = "not a reply";
    fleetprov_provisioned *p = NULL;

    CHECK_RESULT(fleetprov_host_message(h, NULL, n, body, sizeof body - 1, 3),
                 FLEETPROV_INVALID_ARGUMENT);
    CHECK_RESULT(fleetprov_host_message(h, NULL, 0, NULL, 0, 3), FLEETPROV_OK);
    uint8_t look_alike[310];
    memcpy(look_alike, reply, n);
    look_alike[n] = 0xFF; /* the reply's topic, then a byte that is not UTF-8 */
    CHECK_RESULT(fleetprov_host_message(h, look_alike, n + 1, body, sizeof body - 1, 4),
                 FLEETPROV_OK);
    memcpy(look_alike + n, "\0/accepted", 10); /* ... then a NUL and more */
    CHECK_RESULT(fleetprov_host_message(h, look_alike, n + 10, body, sizeof body - 1, 5),
                 FLEETPROV_OK);
    CHECK_RESULT(fleetprov_host_result(h, &p), FLEETPROV_IN_PROGRESS);

    /* The reply's topic, alone in its buffer: taken for the reply, whose body is no reply. */
    uint8_t *exact = malloc(n);
    CHECK(exact != NULL);
    if (exact != NULL) {
        memcpy(exact, reply, n);
        CHECK_RESULT(fleetprov_host_message(h, exact, n, body, sizeof body - 1, 6), FLEETPROV_OK);
        free(exact);
    }
    CHECK_RESULT(fleetprov_host_result(h, &p), FLEETPROV_MALFORMED_REPLY);
    CHECK(p == NULL);
    fleetprov_host_free(h);
    CHECK(atomic_load(&s.freed) == 1);
}

/* fleetprov_host_wake_at reports through an output parameter; NULL is an error. */
static void case_wake_at(void) {
    struct fake_stack s;
    memset(&s, 0, sizeof s);
    fleetprov_host *h = fake_host(&s);
    uint64_t wake = 7;
    CHECK_RESULT(fleetprov_host_wake_at(NULL, &wake), FLEETPROV_INVALID_ARGUMENT);
    CHECK(wake == 7);
    CHECK_RESULT(fleetprov_host_wake_at(h, NULL), FLEETPROV_INVALID_ARGUMENT);
    CHECK_RESULT(fleetprov_host_wake_at(h, &wake), FLEETPROV_OK);
    CHECK(wake == UINT64_MAX); /* not started */
    CHECK_RESULT(fleetprov_host_start(h, 1000), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_host_wake_at(h, &wake), FLEETPROV_OK);
    CHECK(wake > 1000 && wake != UINT64_MAX); /* the connect step's timeout */
    fleetprov_host_free(h);
}

/* fleetprov_host_free from the host's own callback is deferred to the end of the outer call;
 * a blocking call from a host callback is refused. */
static void case_host_callbacks_call_back(void) {
    struct fake_stack s;
    memset(&s, 0, sizeof s);
    s.free_host_in_connect = 1;
    s.provision_in_connect = 1;
    fleetprov_host *h = fake_host(&s);
    CHECK_RESULT(fleetprov_host_start(h, 0), FLEETPROV_OK);
    CHECK(s.connects == 1);
    CHECK(s.provision_r == FLEETPROV_IN_CALLBACK);
    CHECK(atomic_load(&s.freed) == 1); /* freed when fleetprov_host_start returned */
}

/* ---------------------------------------------------------------------------------------- */
/* Blocking calls and frees from a progress callback of the built-in transport. */

struct reentry {
    fleetprov_config *other_config;
    fleetprov_client *other_client;   /* freed from the callback */
    fleetprov_client *self_client;    /* freed from its own callback (deferred) */
    int calls;
    fleetprov_result provision_r, connect_r;
    atomic_int freed; /* the progress callback's userdata_free */
};

static void reentry_free(void *userdata) {
    atomic_fetch_add(&((struct reentry *)userdata)->freed, 1);
}

static void reenter(void *userdata, const fleetprov_progress *progress) {
    struct reentry *r = userdata;
    if (progress->step != FLEETPROV_STEP_CONNECTING || r->calls++ > 0) {
        return;
    }
    fleetprov_provisioned *p = NULL;
    r->provision_r = fleetprov_provision(r->other_config, &p);
    CHECK(p == NULL);
    fleetprov_client *c = NULL;
    CHECK_RESULT(fleetprov_client_new(r->other_config, &c), FLEETPROV_OK);
    r->connect_r = fleetprov_client_connect(c);
    fleetprov_client_free(c); /* a client (and its runtime) freed inside another's runtime */
    if (r->other_client != NULL) {
        fleetprov_client_free(r->other_client);
        r->other_client = NULL;
    }
    if (r->self_client != NULL) {
        fleetprov_client_free(r->self_client);
    }
}

static void case_blocking_in_callback(void) {
    struct reentry r;
    memset(&r, 0, sizeof r);
    r.other_config = refused_config(1);
    CHECK_RESULT(fleetprov_client_new(r.other_config, &r.other_client), FLEETPROV_OK);
    fleetprov_config *c = refused_config(1);
    CHECK_RESULT(fleetprov_config_set_progress_callback(c, reenter, &r, NULL), FLEETPROV_OK);
    fleetprov_provisioned *p = NULL;
    CHECK_RESULT(fleetprov_provision(c, &p), FLEETPROV_CONNECTION);
    CHECK(r.calls >= 1);
    CHECK(r.provision_r == FLEETPROV_IN_CALLBACK);
    CHECK(r.connect_r == FLEETPROV_IN_CALLBACK);
    CHECK(r.other_client == NULL);
    char message[256] = "";
    /* The same from the outside works: the refusal was about the callback only. */
    CHECK_RESULT(fleetprov_provision(r.other_config, &p), FLEETPROV_CONNECTION);
    fleetprov_last_error_message(message, sizeof message, NULL);
    CHECK(strstr(message, "connection") != NULL);
    fleetprov_config_free(c);
    fleetprov_config_free(r.other_config);
}

/* fleetprov_client_free from a progress callback of a blocking call on that client: deferred
 * until the call returns, then freed (LeakSanitizer and valgrind would report it otherwise). */
static void case_free_in_own_callback(void) {
    struct reentry r;
    memset(&r, 0, sizeof r);
    r.other_config = refused_config(1);
    fleetprov_config *c = refused_config(1);
    CHECK_RESULT(fleetprov_config_set_progress_callback(c, reenter, &r, reentry_free),
                 FLEETPROV_OK);
    CHECK_RESULT(fleetprov_client_new(c, &r.self_client), FLEETPROV_OK);
    fleetprov_config_free(c); /* the client keeps the callback */
    CHECK(atomic_load(&r.freed) == 0);
    CHECK_RESULT(fleetprov_client_connect(r.self_client), FLEETPROV_CONNECTION);
    CHECK(r.calls == 1);
    CHECK(r.provision_r == FLEETPROV_IN_CALLBACK && r.connect_r == FLEETPROV_IN_CALLBACK);
    CHECK(atomic_load(&r.freed) == 1); /* the client, last user of the callback, is gone */
    fleetprov_config_free(r.other_config);
}

/* ---------------------------------------------------------------------------------------- */
/* Asynchronous operations. */

static void count_free_chain(void *userdata);

struct chain {
    fleetprov_client *client;
    atomic_int callbacks;
    atomic_int freed;
    atomic_int second_started; /* fleetprov_client_*_async from the first callback: its result */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int first_done;
};

static void chain_cert(void *userdata, fleetprov_result result, fleetprov_certificate *cert,
                       const fleetprov_error *error) {
    struct chain *ch = userdata;
    (void)error;
    CHECK(result != FLEETPROV_OK && cert == NULL);
    if (atomic_fetch_add(&ch->callbacks, 1) == 0) {
        /* From the completion callback: start the next operation on the same client. */
        fleetprov_result r = fleetprov_client_create_keys_and_certificate_async(
            ch->client, chain_cert, ch, count_free_chain);
        atomic_store(&ch->second_started, r == FLEETPROV_OK ? 1 : 2);
        pthread_mutex_lock(&ch->lock);
        ch->first_done = 1;
        pthread_cond_signal(&ch->cond);
        pthread_mutex_unlock(&ch->lock);
    }
}

/* The operations' userdata_free: counted on the chain itself. */
static void count_free_chain(void *userdata) {
    atomic_fetch_add(&((struct chain *)userdata)->freed, 1);
}

/* A second _async call from a completion callback, then fleetprov_client_free: the free waits
 * for every operation's callback and userdata_free. Repeated to give the old race its chances. */
static void case_async_from_completion(void) {
    fleetprov_config *c = refused_config(1);
    for (int i = 0; i < 40 && failures == 0; i++) {
        struct chain ch;
        memset(&ch, 0, sizeof ch);
        pthread_mutex_init(&ch.lock, NULL);
        pthread_cond_init(&ch.cond, NULL);
        CHECK_RESULT(fleetprov_client_new(c, &ch.client), FLEETPROV_OK);
        CHECK_RESULT(fleetprov_client_create_keys_and_certificate_async(ch.client, chain_cert, &ch,
                                                                        count_free_chain),
                     FLEETPROV_OK);
        if (i % 2 == 0) {
            /* Half the rounds free only once the first callback started the second. */
            pthread_mutex_lock(&ch.lock);
            while (!ch.first_done) {
                pthread_cond_wait(&ch.cond, &ch.lock);
            }
            pthread_mutex_unlock(&ch.lock);
        }
        fleetprov_client_free(ch.client);
        /* The second call either started (its callback ran) or was refused because the client
         * was being freed (FLEETPROV_CANCELLED); its userdata was released either way. */
        int started = atomic_load(&ch.second_started);
        CHECK(atomic_load(&ch.callbacks) == (started == 1 ? 2 : 1));
        CHECK(atomic_load(&ch.freed) == 2);
        if (i % 2 == 0) {
            CHECK(started == 1);
        }
        pthread_cond_destroy(&ch.cond);
        pthread_mutex_destroy(&ch.lock);
    }
    fleetprov_config_free(c);
}

struct waited {
    fleetprov_operation *op;
    pthread_mutex_t op_lock; /* held while fleetprov_provision_async stores `op` */
    atomic_int done;         /* the completion callback ran */
    atomic_int freed;        /* its userdata_free ran */
    int plain;               /* written by the callback without atomics: TSan checks the order */
    fleetprov_result own_wait;
};

static void waited_done(void *userdata, fleetprov_result result, fleetprov_provisioned *p,
                        const fleetprov_error *error) {
    struct waited *w = userdata;
    (void)error;
    CHECK((result == FLEETPROV_CONNECTION || result == FLEETPROV_CANCELLED) && p == NULL);
    pthread_mutex_lock(&w->op_lock);
    w->own_wait = fleetprov_operation_wait(w->op); /* would wait for itself */
    pthread_mutex_unlock(&w->op_lock);
    w->plain = 42;
    atomic_store(&w->done, 1);
}

static void waited_free(void *userdata) {
    atomic_store(&((struct waited *)userdata)->freed, 1);
}

static void *waiter(void *arg) {
    struct waited *w = arg;
    CHECK_RESULT(fleetprov_operation_wait(w->op), FLEETPROV_OK);
    CHECK(atomic_load(&w->done) == 1 && atomic_load(&w->freed) == 1);
    CHECK(w->plain == 42);
    return NULL;
}

/* Starts provisioning against the refusing port (`attempts` attempts, 50 ms apart) on a worker
 * thread, reporting to `w`; `w->op` is stored before the callback can look at it. */
static void start_waited(struct waited *w, uint32_t attempts) {
    fleetprov_config *c = refused_config(attempts);
    memset(w, 0, sizeof *w);
    pthread_mutex_init(&w->op_lock, NULL);
    pthread_mutex_lock(&w->op_lock);
    CHECK_RESULT(fleetprov_provision_async(c, waited_done, w, waited_free, &w->op), FLEETPROV_OK);
    pthread_mutex_unlock(&w->op_lock);
    fleetprov_config_free(c);
}

/* Two threads wait for one operation: each returns only after its callback and userdata_free;
 * the callback's own wait is refused; free after the waits. */
static void case_two_waiters(void) {
    struct waited w;
    start_waited(&w, 3); /* about 100 ms of retries */
    pthread_t a, b;
    pthread_create(&a, NULL, waiter, &w);
    pthread_create(&b, NULL, waiter, &w);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    CHECK(w.own_wait == FLEETPROV_IN_CALLBACK);
    fleetprov_operation_free(w.op);
    pthread_mutex_destroy(&w.op_lock);
}

/* fleetprov_operation_free while the operation runs: cancels it and returns only after the
 * callback and userdata_free. */
static void case_free_running_operation(void) {
    struct waited w;
    start_waited(&w, 5);
    CHECK_RESULT(fleetprov_operation_cancel(w.op), FLEETPROV_OK);
    fleetprov_operation_free(w.op);
    CHECK(atomic_load(&w.done) == 1 && atomic_load(&w.freed) == 1);
    CHECK(w.plain == 42);
    pthread_mutex_destroy(&w.op_lock);
}

/* ---------------------------------------------------------------------------------------- */
/* The last error: truncated into a small buffer, cleared by a success. */

static void case_last_error(void) {
    fleetprov_config *c = NULL;
    CHECK_RESULT(fleetprov_config_new(&c), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_config_set_endpoint(c, NULL, 1), FLEETPROV_INVALID_ARGUMENT);
    const char *full = "invalid argument: host is NULL";
    char big[128];
    size_t needed = 0;
    CHECK_RESULT(fleetprov_last_error_message(big, sizeof big, &needed), FLEETPROV_OK);
    CHECK(strcmp(big, full) == 0);
    CHECK(needed == strlen(full) + 1);
    char small[8];
    memset(small, 'x', sizeof small);
    needed = 0;
    CHECK_RESULT(fleetprov_last_error_message(small, sizeof small, &needed),
                 FLEETPROV_BUFFER_TOO_SMALL);
    CHECK(memcmp(small, full, 7) == 0 && small[7] == '\0');
    CHECK(needed == strlen(full) + 1);
    char exact[31]; /* strlen(full) + 1 */
    CHECK_RESULT(fleetprov_last_error_message(exact, sizeof exact, NULL), FLEETPROV_OK);
    CHECK(strcmp(exact, full) == 0);
    CHECK_RESULT(fleetprov_last_error_message(exact, sizeof exact - 1, NULL),
                 FLEETPROV_BUFFER_TOO_SMALL);
    CHECK(strlen(exact) == sizeof exact - 2);
    CHECK_RESULT(fleetprov_last_error_message(NULL, 0, &needed), FLEETPROV_BUFFER_TOO_SMALL);
    CHECK(needed == strlen(full) + 1);
    /* A success clears it. */
    CHECK_RESULT(fleetprov_config_set_verify(c, true), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_last_error_message(big, sizeof big, &needed), FLEETPROV_OK);
    CHECK(big[0] == '\0' && needed == 1);
    fleetprov_config_free(c);
}

/* ---------------------------------------------------------------------------------------- */
/* Panics (library built with the cargo feature test-panics; FLEETPROV_TEST_PANIC names the
 * site that panics). */

static void case_panic_host(void) {
    struct fake_stack s;
    memset(&s, 0, sizeof s);
    fleetprov_host *h = fake_host(&s);
    CHECK_RESULT(fleetprov_host_start(h, 0), FLEETPROV_OK);
    setenv("FLEETPROV_TEST_PANIC", "host-event", 1);
    CHECK_RESULT(fleetprov_host_tick(h, 10), FLEETPROV_PANIC);
    unsetenv("FLEETPROV_TEST_PANIC");
    /* The flow is over with FLEETPROV_PANIC: no spinning on IN_PROGRESS or "tick now". */
    fleetprov_provisioned *p = NULL;
    CHECK_RESULT(fleetprov_host_tick(h, 20), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_host_connected(h, 20), FLEETPROV_OK);
    CHECK_RESULT(fleetprov_host_result(h, &p), FLEETPROV_PANIC);
    CHECK_RESULT(fleetprov_host_result(h, &p), FLEETPROV_PANIC);
    char message[128] = "";
    fleetprov_last_error_message(message, sizeof message, NULL);
    CHECK(strcmp(message, "internal error: the library panicked") == 0);
    uint64_t wake = 0;
    CHECK_RESULT(fleetprov_host_wake_at(h, &wake), FLEETPROV_OK);
    CHECK(wake == UINT64_MAX);
    int connects = s.connects;
    CHECK_RESULT(fleetprov_host_tick(h, 100000), FLEETPROV_OK);
    CHECK(s.connects == connects); /* nothing more is asked of the stack */
    fleetprov_host_free(h);
}

static void case_panic_provision(void) {
    fleetprov_config *c = refused_config(1);
    fleetprov_provisioned *p = NULL;
    setenv("FLEETPROV_TEST_PANIC", "provision", 1);
    CHECK_RESULT(fleetprov_provision(c, &p), FLEETPROV_PANIC);
    unsetenv("FLEETPROV_TEST_PANIC");
    CHECK(p == NULL);
    /* The process and later calls go on. */
    CHECK_RESULT(fleetprov_provision(c, &p), FLEETPROV_CONNECTION);
    fleetprov_config_free(c);
}

/* A worker thread that cannot start (FLEETPROV_TEST_FAIL=thread-spawn): FLEETPROV_INTERNAL, not
 * retryable, no operation handle, the userdata released. */
static void case_internal_thread_spawn(void) {
    fleetprov_config *c = refused_config(1);
    struct waited w;
    memset(&w, 0, sizeof w);
    pthread_mutex_init(&w.op_lock, NULL);
    setenv("FLEETPROV_TEST_FAIL", "thread-spawn", 1);
    CHECK_RESULT(fleetprov_provision_async(c, waited_done, &w, waited_free, &w.op),
                 FLEETPROV_INTERNAL);
    unsetenv("FLEETPROV_TEST_FAIL");
    CHECK(w.op == NULL);
    CHECK(atomic_load(&w.done) == 0 && atomic_load(&w.freed) == 1);
    fleetprov_error *e = fleetprov_last_error();
    CHECK(e != NULL && fleetprov_error_result(e) == FLEETPROV_INTERNAL);
    CHECK(e != NULL && !fleetprov_error_is_retryable(e));
    CHECK(e != NULL && strstr(fleetprov_error_message(e), "cannot start a worker thread") != NULL);
    fleetprov_error_free(e);
    fleetprov_config_free(c);
    pthread_mutex_destroy(&w.op_lock);
}

/* ---------------------------------------------------------------------------------------- */

static const struct {
    const char *name;
    void (*run)(void);
} CASES[] = {
    {"suback_codes", case_suback_codes},
    {"wake_at", case_wake_at},
    {"host_callbacks_call_back", case_host_callbacks_call_back},
    {"host_callbacks_size", case_host_callbacks_size},
    {"host_topic_bytes", case_host_topic_bytes},
    {"blocking_in_callback", case_blocking_in_callback},
    {"free_in_own_callback", case_free_in_own_callback},
    {"async_from_completion", case_async_from_completion},
    {"two_waiters", case_two_waiters},
    {"free_running_operation", case_free_running_operation},
    {"last_error", case_last_error},
    {"panic_host", case_panic_host},
    {"panic_provision", case_panic_provision},
    {"internal_thread_spawn", case_internal_thread_spawn},
};

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASE\n", argv[0]);
        return 2;
    }
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) {
        if (strcmp(argv[1], CASES[i].name) == 0) {
            CASES[i].run();
            if (refusing_socket >= 0) {
                close(refusing_socket);
            }
            if (failures > 0) {
                fprintf(stderr, "%s: %d check(s) failed\n", argv[1], failures);
                return 1;
            }
            printf("%s: ok\n", argv[1]);
            return 0;
        }
    }
    fprintf(stderr, "unknown case %s\n", argv[1]);
    return 2;
}
