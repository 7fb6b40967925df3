/* provision_with_csr: the firmware brings its own CSR (FLEETPROV_METHOD_EXTERNAL_CSR).
 *
 *   provision_with_csr --endpoint HOST --port N --ca ca.pem --cert claim.pem --key claim.key \
 *       --template DemoTemplate --param SerialNumber=ABC123 --out DIR [--format json|cbor] \
 *       [--state-dir DIR] [--retry MAX,INITIAL_MS,MAX_MS]
 *
 * The program makes an EC P-256 key with OpenSSL (standing in for a secure element) and a CSR
 * signed with it, hands only the CSR to the library (fleetprov_config_set_csr_pem), checks the
 * returned certificate against its key and writes private.key (0600) and certificate.pem into
 * DIR (0700) itself: with an external CSR the library never sees the key, so it writes nothing.
 * Prints thing_name=, certificate_id=, output_dir=, attempts= and resumed=0|1 on success.
 *
 * With --state-dir the library keeps its resume journal there, and a certificate it resumes was
 * made for the key of the run that created it: so the key must outlive the process, as it
 * would in a secure element. The program keeps it in STATE_DIR/device.key (0600) and reuses it
 * on later runs; without --state-dir each run makes a fresh key.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "common.h"

static void openssl_failure(const char *what) {
    unsigned long e = ERR_get_error();
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    fprintf(stderr, "provision_with_csr: %s: %s\n", what, e ? buf : "failed");
    printf("result=openssl\nerror=%s: %s\n", what, e ? buf : "failed");
    ERR_clear_error();
}

/* The PEM text in a memory BIO as a NUL-terminated string (in `out`, freed with
 * OPENSSL_clear_free(out, len + 1)). */
static char *bio_to_string(BIO *bio, size_t *len_out) {
    char *data = NULL;
    long len = BIO_get_mem_data(bio, &data);
    if (len <= 0) {
        return NULL;
    }
    char *s = OPENSSL_malloc((size_t)len + 1);
    if (s == NULL) {
        return NULL;
    }
    memcpy(s, data, (size_t)len);
    s[len] = '\0';
    *len_out = (size_t)len;
    return s;
}

/* Writes `key` as PEM to dir/name (0600, atomically). 0 or -1 (message printed). */
static int save_key(EVP_PKEY *key, const char *dir, const char *name) {
    int rc = -1;
    char *pem = NULL;
    size_t len = 0;
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio == NULL || !PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL) ||
        (pem = bio_to_string(bio, &len)) == NULL) {
        openssl_failure("writing the private key");
    } else if (example_write_file(dir, name, pem, len, 0600) == 0) {
        rc = 0;
    }
    if (pem != NULL) {
        OPENSSL_clear_free(pem, len + 1);
    }
    if (bio != NULL) {
        char *data = NULL;
        long n = BIO_get_mem_data(bio, &data);
        if (n > 0) {
            OPENSSL_cleanse(data, (size_t)n); /* the BIO held the key too */
        }
        BIO_free(bio);
    }
    return rc;
}

/* The device key: with a state directory the one kept there from an earlier run (made and kept
 * now if there is none), else a fresh P-256 key. NULL on failure (message printed). */
static EVP_PKEY *device_key(const char *state_dir) {
    char path[4096];
    if (state_dir != NULL) {
        if (snprintf(path, sizeof path, "%s/device.key", state_dir) >= (int)sizeof path) {
            fprintf(stderr, "provision_with_csr: path too long: %s\n", state_dir);
            return NULL;
        }
        FILE *f = fopen(path, "r");
        if (f != NULL) {
            EVP_PKEY *key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
            fclose(f);
            if (key == NULL) {
                openssl_failure(path);
            } else {
                fprintf(stderr, "provision_with_csr: using the device key kept in %s\n", path);
            }
            return key;
        }
        if (errno != ENOENT) {
            perror(path);
            return NULL;
        }
    }
    EVP_PKEY *key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (key == NULL) {
        openssl_failure("EC P-256 key generation");
        return NULL;
    }
    if (state_dir != NULL &&
        (example_make_private_dir(state_dir) != 0 || save_key(key, state_dir, "device.key") != 0)) {
        fprintf(stderr, "provision_with_csr: cannot keep the device key in %s\n", state_dir);
        EVP_PKEY_free(key);
        return NULL;
    }
    return key;
}

/* Makes a CSR for `key` (subject CN=<cn>, SHA-256 signature by that key); takes `key` over. */
static int make_csr(const char *cn, EVP_PKEY *key, EVP_PKEY **key_out, char **csr_out,
                    size_t *csr_len) {
    int ok = 0;
    X509_REQ *req = NULL;
    X509_NAME *name = NULL;
    BIO *bio = NULL;
    if (key == NULL) {
        goto out;
    }
    req = X509_REQ_new();
    name = X509_NAME_new();
    if (req == NULL || name == NULL || !X509_REQ_set_version(req, X509_REQ_VERSION_1) ||
        !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1,
                                    0) ||
        !X509_REQ_set_subject_name(req, name) || !X509_REQ_set_pubkey(req, key)) {
        openssl_failure("building the CSR");
        goto out;
    }
    if (X509_REQ_sign(req, key, EVP_sha256()) <= 0) {
        openssl_failure("signing the CSR");
        goto out;
    }
    bio = BIO_new(BIO_s_mem());
    if (bio == NULL || !PEM_write_bio_X509_REQ(bio, req) ||
        (*csr_out = bio_to_string(bio, csr_len)) == NULL) {
        openssl_failure("writing the CSR");
        goto out;
    }
    *key_out = key;
    key = NULL;
    ok = 1;
out:
    BIO_free(bio);
    X509_NAME_free(name);
    X509_REQ_free(req);
    EVP_PKEY_free(key);
    return ok ? 0 : -1;
}

/* Runs on the calling thread (blocking fleetprov_provision); `progress` lives for the call. */
static void on_progress(void *userdata, const fleetprov_progress *progress) {
    example_print_progress(userdata, progress);
}

/* 0 when `cert_pem` holds a certificate for `key`. */
static int certificate_matches(const char *cert_pem, EVP_PKEY *key) {
    BIO *bio = BIO_new_mem_buf(cert_pem, -1);
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    int ok = cert != NULL && X509_check_private_key(cert, key) == 1;
    if (!ok) {
        openssl_failure("checking the certificate against the device key");
    }
    X509_free(cert);
    BIO_free(bio);
    return ok ? 0 : -1;
}

int main(int argc, char **argv) {
    struct example_args args;
    if (example_parse_args(argc, argv, &args, 1) != 0) {
        return 1;
    }
    int status = 1;
    EVP_PKEY *key = NULL;
    char *csr = NULL;
    size_t csr_len = 0;
    fleetprov_provisioned *p = NULL;
    fleetprov_config *cfg = example_config(&args);
    if (cfg == NULL) {
        goto out;
    }
    const char *cn = "fleetprov device";
    for (size_t i = 0; i < args.param_count; i++) {
        if (strcmp(args.param_keys[i], "SerialNumber") == 0) {
            cn = args.param_values[i];
        }
    }
    if (make_csr(cn, device_key(args.state_dir), &key, &csr, &csr_len) != 0) {
        goto out;
    }
    fleetprov_result r = fleetprov_config_set_csr_pem(cfg, csr); /* also selects EXTERNAL_CSR */
    if (r != FLEETPROV_OK) {
        example_report_failure("fleetprov_config_set_csr_pem", r);
        goto out;
    }
    /* Static userdata (the prefix): nothing to free. */
    r = fleetprov_config_set_progress_callback(cfg, on_progress, (void *)"provision_with_csr:",
                                               NULL);
    if (r != FLEETPROV_OK) {
        example_report_failure("fleetprov_config_set_progress_callback", r);
        goto out;
    }
    r = fleetprov_provision(cfg, &p);
    if (r != FLEETPROV_OK) {
        example_report_failure("fleetprov_provision", r);
        goto out;
    }
    const char *cert_pem = fleetprov_provisioned_certificate_pem(p);
    if (fleetprov_provisioned_private_key(p) != NULL) {
        fprintf(stderr, "provision_with_csr: the library unexpectedly holds a private key\n");
        goto out;
    }
    if (certificate_matches(cert_pem, key) != 0) {
        goto out;
    }
    if (example_make_private_dir(args.out_dir) != 0) {
        perror(args.out_dir);
        printf("result=storage\nerror=cannot create %s\n", args.out_dir);
        goto out;
    }
    if (save_key(key, args.out_dir, "private.key") != 0 ||
        example_write_file(args.out_dir, "certificate.pem", cert_pem, strlen(cert_pem), 0644) !=
            0) {
        printf("result=storage\nerror=cannot write the credentials to %s\n", args.out_dir);
        goto out;
    }
    printf("thing_name=%s\n", fleetprov_provisioned_thing_name(p));
    printf("certificate_id=%s\n", fleetprov_provisioned_certificate_id(p));
    printf("output_dir=%s\n", args.out_dir);
    printf("attempts=%u\n", (unsigned)fleetprov_provisioned_attempts(p));
    printf("resumed=%d\n", fleetprov_provisioned_resumed(p) ? 1 : 0);
    status = 0;
out:
    fleetprov_provisioned_free(p);
    fleetprov_config_free(cfg);
    OPENSSL_free(csr);
    EVP_PKEY_free(key);
    return status;
}
