/* provision_signer: the device key stays outside the library (FLEETPROV_METHOD_EXTERNAL_SIGNER).
 *
 *   provision_signer --endpoint HOST --port N --ca ca.pem --cert claim.pem --key claim.key \
 *       --template DemoTemplate --param SerialNumber=ABC123 --out DIR [--format json|cbor] \
 *       [--key-file DEVICE.key] [--state-dir DIR] [--retry MAX,INITIAL_MS,MAX_MS] \
 *       [--break-signer fail|wrong]
 *
 * OpenSSL stands in for a secure element: the program holds a P-256 key as an EVP_PKEY (made
 * at start, or read from --key-file), gives the library only its public half (i2d_PUBKEY: a
 * SubjectPublicKeyInfo in DER) and a callback that signs a digest with it (EVP_PKEY_sign,
 * ECDSA, DER signature). The library builds the CSR for that key, has it signed through the
 * callback, checks the signature, and provisions with fleetprov_provision(). The key is never
 * written out nor handed to the library. (provision_pkcs11.c does the same with keys in a
 * PKCS#11 token, the claim key included.)
 *
 * The verification connection (the new certificate's first TLS connection) is made with the
 * key too: the library asks the callback to sign its handshake, so the callback is called
 * twice in a provisioning (CSR, handshake). The library writes no files (an output directory
 * is refused with a signer: there is no private key to write). The program checks the
 * returned certificate itself (its public key is the EVP_PKEY's: EVP_PKEY_eq, and
 * X509_check_private_key) and writes DIR/certificate.pem (DIR 0700); whoever holds the key
 * (here the test, through --key-file) can check the pair.
 *
 * Prints thing_name=, certificate_id=, registration_confirmed=0|1 (see
 * fleetprov_provisioned_registration_confirmed), attempts=, resumed=0|1, signatures=N (calls of
 * the callback) and output_dir= on success (exit 0); the result name, the error text and a
 * rejection's fields on failure (exit 1).
 *
 * Test aid: --break-signer fail makes the callback report a failure; --break-signer wrong makes
 * it return a signature that does not verify. Either way the library stops with
 * FLEETPROV_SIGNER and nothing may reach the service.
 */
#include <stdio.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "common.h"

enum breakage { SIGN_OK, SIGN_FAIL, SIGN_WRONG };

/* The "secure element": the key, and what the callback did. */
struct signer {
    EVP_PKEY *key;
    enum breakage breakage;
    unsigned calls;
};

static void openssl_failure(const char *what) {
    unsigned long e = ERR_get_error();
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    fprintf(stderr, "provision_signer: %s: %s\n", what, e ? buf : "failed");
    printf("result=openssl\nerror=%s: %s\n", what, e ? buf : "failed");
    ERR_clear_error();
}

/* fleetprov_sign_callback: ECDSA P-256 over the SHA-256 digest the library computed (for the
 * CSR, then for the verification connection's TLS handshake). Runs on the thread calling
 * fleetprov_provision(); every pointer lives for the call only. */
static int32_t sign_digest(void *userdata, const uint8_t *message, size_t message_len,
                           const uint8_t *digest, size_t digest_len, uint8_t *signature,
                           size_t *signature_len) {
    struct signer *s = userdata;
    s->calls++;
    if (s->breakage == SIGN_FAIL) {
        fprintf(stderr, "provision_signer: the signer fails (--break-signer fail)\n");
        return -1;
    }
    /* A secure element would see only the digest; this one checks it is the message's. */
    unsigned char own[EVP_MAX_MD_SIZE];
    unsigned int own_len = 0;
    if (digest_len != 32 || !EVP_Digest(message, message_len, own, &own_len, EVP_sha256(), NULL) ||
        own_len != digest_len || memcmp(own, digest, digest_len) != 0) {
        fprintf(stderr, "provision_signer: the digest is not SHA-256 of the message\n");
        return -1;
    }
    int rc = -1;
    size_t needed = 0;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, s->key, NULL);
    if (ctx == NULL || EVP_PKEY_sign_init(ctx) <= 0 ||
        EVP_PKEY_sign(ctx, NULL, &needed, digest, digest_len) <= 0) {
        openssl_failure("preparing the signature");
    } else if (needed > *signature_len) {
        fprintf(stderr, "provision_signer: %zu bytes of room for a %zu-byte signature\n",
                *signature_len, needed);
    } else if (EVP_PKEY_sign(ctx, signature, &needed, digest, digest_len) <= 0) {
        openssl_failure("signing");
    } else {
        if (s->breakage == SIGN_WRONG) {
            /* The last byte of s in a DER ECDSA-Sig-Value: still well-formed, no longer valid. */
            signature[needed - 1] ^= 0x01;
            fprintf(stderr, "provision_signer: the signer signs wrong (--break-signer wrong)\n");
        }
        *signature_len = needed;
        rc = 0;
    }
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

/* The device key: read from `path`, or a fresh P-256 key. NULL on failure (message printed). */
static EVP_PKEY *device_key(const char *path) {
    EVP_PKEY *key = NULL;
    if (path == NULL) {
        key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
        if (key == NULL) {
            openssl_failure("EC P-256 key generation");
        }
        return key;
    }
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        perror(path);
        printf("result=storage\nerror=cannot read %s\n", path);
        return NULL;
    }
    key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (key == NULL) {
        openssl_failure(path);
        return NULL;
    }
    char group[64] = "";
    size_t len = 0;
    if (!EVP_PKEY_is_a(key, "EC") ||
        !EVP_PKEY_get_utf8_string_param(key, "group", group, sizeof group, &len) ||
        strcmp(group, "prime256v1") != 0) {
        fprintf(stderr, "provision_signer: %s is not a P-256 key\n", path);
        printf("result=key\nerror=%s is not a P-256 key\n", path);
        EVP_PKEY_free(key);
        return NULL;
    }
    return key;
}

/* 0 when `cert_pem` is a certificate for `key` (same public key; the key completes it). */
static int certificate_matches(const char *cert_pem, EVP_PKEY *key) {
    BIO *bio = BIO_new_mem_buf(cert_pem, -1);
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    EVP_PKEY *pub = cert ? X509_get0_pubkey(cert) : NULL;
    int ok = pub != NULL && EVP_PKEY_eq(pub, key) == 1 && X509_check_private_key(cert, key) == 1;
    if (!ok) {
        openssl_failure("checking the certificate against the device key");
    }
    X509_free(cert);
    BIO_free(bio);
    return ok ? 0 : -1;
}

static void on_progress(void *userdata, const fleetprov_progress *progress) {
    example_print_progress(userdata, progress);
}

int main(int argc, char **argv) {
    struct example_args args;
    const char *key_file = NULL, *breakage = NULL;
    const struct example_option options[] = {
        {"--key-file", "DEVICE.key", &key_file, NULL},
        {"--break-signer", "fail|wrong", &breakage, NULL},
    };
    if (example_parse_args_with(argc, argv, &args, EXAMPLE_REQUIRE_OUT, options,
                                sizeof options / sizeof options[0]) != 0) {
        return 1;
    }
    struct signer signer = {NULL, SIGN_OK, 0};
    if (breakage != NULL) {
        if (strcmp(breakage, "fail") == 0) {
            signer.breakage = SIGN_FAIL;
        } else if (strcmp(breakage, "wrong") == 0) {
            signer.breakage = SIGN_WRONG;
        } else {
            fprintf(stderr, "%s: --break-signer wants fail or wrong, got %s\n", argv[0], breakage);
            return 1;
        }
    }
    int status = 1;
    unsigned char *spki = NULL;
    fleetprov_provisioned *p = NULL;
    fleetprov_config *cfg = example_config(&args);
    if (cfg == NULL) {
        goto out;
    }
    signer.key = device_key(key_file);
    if (signer.key == NULL) {
        goto out;
    }
    int spki_len = i2d_PUBKEY(signer.key, &spki); /* the public half only */
    if (spki_len <= 0) {
        openssl_failure("encoding the public key");
        goto out;
    }
    /* `signer` outlives the config: no userdata_free. Selects FLEETPROV_METHOD_EXTERNAL_SIGNER
     * (and the library signs the CSR right away, in fleetprov_provision). */
    fleetprov_result r = fleetprov_config_set_signer(cfg, spki, (size_t)spki_len, sign_digest,
                                                     &signer, NULL);
    const char *what = "fleetprov_config_set_signer";
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_progress_callback";
        r = fleetprov_config_set_progress_callback(cfg, on_progress, (void *)"provision_signer:",
                                                   NULL);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_provision";
        r = fleetprov_provision(cfg, &p);
    }
    fprintf(stderr, "provision_signer: the signer was called %u time(s)\n", signer.calls);
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        printf("signatures=%u\n", signer.calls);
        goto out;
    }
    const char *cert_pem = fleetprov_provisioned_certificate_pem(p);
    if (fleetprov_provisioned_private_key(p) != NULL) {
        fprintf(stderr, "provision_signer: the library unexpectedly holds a private key\n");
        goto out;
    }
    if (certificate_matches(cert_pem, signer.key) != 0) {
        goto out;
    }
    if (example_make_private_dir(args.out_dir) != 0) {
        perror(args.out_dir);
        printf("result=storage\nerror=cannot create %s\n", args.out_dir);
        goto out;
    }
    if (example_write_file(args.out_dir, "certificate.pem", cert_pem, strlen(cert_pem), 0644) !=
        0) {
        printf("result=storage\nerror=cannot write the certificate to %s\n", args.out_dir);
        goto out;
    }
    printf("thing_name=%s\n", fleetprov_provisioned_thing_name(p));
    printf("certificate_id=%s\n", fleetprov_provisioned_certificate_id(p));
    printf("registration_confirmed=%d\n", fleetprov_provisioned_registration_confirmed(p) ? 1 : 0);
    printf("attempts=%u\n", (unsigned)fleetprov_provisioned_attempts(p));
    printf("resumed=%d\n", fleetprov_provisioned_resumed(p) ? 1 : 0);
    printf("signatures=%u\n", signer.calls);
    printf("output_dir=%s\n", args.out_dir);
    status = 0;
out:
    fleetprov_provisioned_free(p);
    fleetprov_config_free(cfg);
    OPENSSL_free(spki);
    EVP_PKEY_free(signer.key);
    return status;
}
