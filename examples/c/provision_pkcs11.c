/* provision_pkcs11: provisioning with keys that never leave a PKCS#11 token (a secure element,
 * a TPM or an HSM; SoftHSM2 in the tests).
 *
 *   provision_pkcs11 --module /usr/lib/softhsm/libsofthsm2.so --token LABEL --pin-env VAR \
 *       --endpoint HOST --port N --ca ca.pem --template DemoTemplate \
 *       --param SerialNumber=ABC123 [--cert claim.pem] [--claim-label claim] \
 *       [--device-label device] [--state-dir DIR] [--format json|cbor] \
 *       [--retry MAX,INITIAL_MS,MAX_MS] [--reprovision] [--break-signer fail|wrong]
 *   provision_pkcs11 --rotate THING --module ... --token ... --pin-env VAR --endpoint HOST \
 *       --port N --ca ca.pem [--template RotationTemplate] [--state-dir DIR]
 *   provision_pkcs11 --show --module ... --token ... --pin-env VAR
 *
 * --pin PIN works too, but puts the PIN where `ps` shows it; --pin-env VAR reads it from the
 * environment variable VAR. The PIN is never printed.
 *
 * What the token holds (labels are the defaults):
 *
 *   object                 class                   label     made by
 *   claim key              private key             "claim"   the factory (imported)
 *   claim certificate      certificate (optional)  "claim"   the factory, or --cert FILE
 *   device key pair        private + public key    "device"  this program (C_GenerateKeyPair)
 *   device certificate     certificate             "device"  this program, once provisioned
 *
 * The flow:
 *  1. dlopen() the module given by --module (there is no link-time dependency on any PKCS#11
 *     library: only the header is needed to build), C_Initialize, find the slot whose token
 *     has the label --token, open a read-write session and log in with the user PIN.
 *  2. A certificate object labelled "device" means this device is provisioned already: print
 *     its certificate id and already_provisioned=1, and stop without connecting (firmware does
 *     this at every boot). --reprovision gets a new certificate for the same key anyway.
 *  3. The claim certificate (--cert, or the token's certificate labelled "claim") and a signing
 *     callback for the claim key go to fleetprov_config_set_claim_signer(): the library makes
 *     its TLS connection with them and asks the callback for the one signature each handshake
 *     needs (C_Sign in the token).
 *  4. The device key pair labelled "device" is generated INSIDE the token if it is not there
 *     (sensitive, not extractable); its public point and a signing callback go to
 *     fleetprov_config_set_signer(). The library builds the CSR and has it signed (C_Sign), and
 *     signs the verification connection's TLS handshake with it too.
 *  5. fleetprov_provision(). On success the issued certificate is stored in the token as a
 *     certificate object next to the key (same CKA_ID, label "device").
 * Nothing private ever exists in this process: no private key value is read from the token
 * (it could not be: CKA_SENSITIVE), and no key file is written.
 *
 * Resuming: with --state-dir DIR the library keeps its journal (the certificate it got for the
 * device key, not yet registered) there. A run that dies on the way (killed, power lost) left
 * the key pair in the token; the next run finds it, reuses it, and the library takes up the
 * journal's certificate instead of asking for another (resumed=1). (The window between the
 * library's success and the certificate landing in the token remains: a run killed exactly
 * there gets a second certificate for the same key the next time.)
 *
 * --rotate THING: a new certificate for a new key, for the device THING provisioned earlier.
 * The current device certificate and key act as the claim credentials; the client id is THING;
 * the template (default RotationTemplate) gets ThingName=THING. The new key pair is generated
 * in the token as "device-next" (a rotation that died is resumed with it). Only after the new
 * certificate has connected does the program store it (as "device-next"), then delete the old
 * key pair and certificate and relabel the new objects "device". A run that finds a certificate
 * labelled "device-next" at start finishes such a switch first.
 *
 * Prints thing_name=, certificate_id=, attempts=, resumed=0|1, signatures_claim=N,
 * signatures_device=N (calls of the two callbacks), already_provisioned=0|1 (and rotated=1
 * for --rotate) on success, exit 0. On failure: result=<FLEETPROV_...> and error=<text> (see
 * example_report_failure), or for a failure of the token result=pkcs11 and
 * error=<PKCS#11 function>: <CKR_... or what is wrong>; exit 1 (2 for a usage error).
 *
 * --show lists the token's objects (class, label, CKA_ID, and their public attributes: key
 * type, the sensitivity flags of private keys, the point of EC public keys, the DER of
 * certificates), one object= line each. Private values are never read.
 *
 * Test aids: --break-signer fail|wrong breaks the claim key's callback (fail: it returns -1;
 * wrong: it flips a bit of the signature), which the library must refuse (FLEETPROV_SIGNER)
 * before anything reaches the service. FLEETPROV_EXAMPLE_STOP_AT=STEP freezes the program at
 * that step, as in provision.c.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* pkcs11.h: p11-kit's (self-contained) or the OASIS one, which wants these platform macros
 * defined first (p11-kit's ignores them). */
#ifndef CK_PTR
#define CK_PTR *
#endif
#define CK_DECLARE_FUNCTION(returnType, name) returnType name
#define CK_DECLARE_FUNCTION_POINTER(returnType, name) returnType(*name)
#define CK_CALLBACK_FUNCTION(returnType, name) returnType(*name)
#ifndef NULL_PTR
#define NULL_PTR NULL
#endif
#include <pkcs11.h>

#include "common.h"

#define PROG "provision_pkcs11"
#define EXIT_USAGE 2

/* DER of the OIDs of the curves (CKA_EC_PARAMS): P-256 (prime256v1) and P-384 (secp384r1). */
static const CK_BYTE OID_P256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
static const CK_BYTE OID_P384[] = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};

/* ---- reporting ------------------------------------------------------------------------------ */

struct name {
    CK_ULONG value;
    const char *name;
};
#define NAME(x) {x, #x}

/* The return values a provisioning program is likely to meet, by name. */
static const struct name ckr_names[] = {
    NAME(CKR_OK),
    NAME(CKR_CANCEL),
    NAME(CKR_HOST_MEMORY),
    NAME(CKR_SLOT_ID_INVALID),
    NAME(CKR_GENERAL_ERROR),
    NAME(CKR_FUNCTION_FAILED),
    NAME(CKR_ARGUMENTS_BAD),
    NAME(CKR_ATTRIBUTE_READ_ONLY),
    NAME(CKR_ATTRIBUTE_SENSITIVE),
    NAME(CKR_ATTRIBUTE_TYPE_INVALID),
    NAME(CKR_ATTRIBUTE_VALUE_INVALID),
    NAME(CKR_DATA_INVALID),
    NAME(CKR_DATA_LEN_RANGE),
    NAME(CKR_DEVICE_ERROR),
    NAME(CKR_DEVICE_MEMORY),
    NAME(CKR_DEVICE_REMOVED),
    NAME(CKR_FUNCTION_CANCELED),
    NAME(CKR_FUNCTION_NOT_SUPPORTED),
    NAME(CKR_KEY_HANDLE_INVALID),
    NAME(CKR_KEY_SIZE_RANGE),
    NAME(CKR_KEY_TYPE_INCONSISTENT),
    NAME(CKR_KEY_FUNCTION_NOT_PERMITTED),
    NAME(CKR_MECHANISM_INVALID),
    NAME(CKR_MECHANISM_PARAM_INVALID),
    NAME(CKR_OBJECT_HANDLE_INVALID),
    NAME(CKR_OPERATION_ACTIVE),
    NAME(CKR_OPERATION_NOT_INITIALIZED),
    NAME(CKR_PIN_INCORRECT),
    NAME(CKR_PIN_INVALID),
    NAME(CKR_PIN_LEN_RANGE),
    NAME(CKR_PIN_EXPIRED),
    NAME(CKR_PIN_LOCKED),
    NAME(CKR_SESSION_CLOSED),
    NAME(CKR_SESSION_COUNT),
    NAME(CKR_SESSION_HANDLE_INVALID),
    NAME(CKR_SESSION_READ_ONLY),
    NAME(CKR_SIGNATURE_INVALID),
    NAME(CKR_SIGNATURE_LEN_RANGE),
    NAME(CKR_TEMPLATE_INCOMPLETE),
    NAME(CKR_TEMPLATE_INCONSISTENT),
    NAME(CKR_TOKEN_NOT_PRESENT),
    NAME(CKR_TOKEN_NOT_RECOGNIZED),
    NAME(CKR_TOKEN_WRITE_PROTECTED),
    NAME(CKR_USER_ALREADY_LOGGED_IN),
    NAME(CKR_USER_NOT_LOGGED_IN),
    NAME(CKR_USER_PIN_NOT_INITIALIZED),
    NAME(CKR_USER_TYPE_INVALID),
    NAME(CKR_RANDOM_NO_RNG),
    NAME(CKR_DOMAIN_PARAMS_INVALID),
    NAME(CKR_BUFFER_TOO_SMALL),
    NAME(CKR_CRYPTOKI_NOT_INITIALIZED),
    NAME(CKR_CRYPTOKI_ALREADY_INITIALIZED),
};

static const struct name key_type_names[] = {
    NAME(CKK_RSA), NAME(CKK_DSA), NAME(CKK_DH), NAME(CKK_EC), NAME(CKK_EC_EDWARDS),
    NAME(CKK_GENERIC_SECRET), NAME(CKK_AES),
};

static const struct name class_names[] = {
    {CKO_DATA, "data"},           {CKO_CERTIFICATE, "certificate"},
    {CKO_PUBLIC_KEY, "public_key"}, {CKO_PRIVATE_KEY, "private_key"},
    {CKO_SECRET_KEY, "secret_key"},
};

/* The name of `value` in `table`, or its number in hex (in a static buffer). */
static const char *lookup(const struct name *table, size_t n, CK_ULONG value) {
    static char unknown[32];
    for (size_t i = 0; i < n; i++) {
        if (table[i].value == value) {
            return table[i].name;
        }
    }
    snprintf(unknown, sizeof unknown, "0x%lx", (unsigned long)value);
    return unknown;
}
#define LOOKUP(table, value) lookup(table, sizeof table / sizeof table[0], value)

/* A failure of the token or of what it holds: result=pkcs11, error=FUNCTION: DETAIL. */
static void pkcs11_failure(const char *function, const char *detail) {
    fprintf(stderr, PROG ": %s: %s\n", function, detail);
    printf("result=pkcs11\nerror=%s: %s\n", function, detail);
    fflush(stdout);
}

/* A PKCS#11 function that returned `rv`: result=pkcs11, error=FUNCTION: CKR_NAME. */
static void ck_failure(const char *function, CK_RV rv) {
    pkcs11_failure(function, LOOKUP(ckr_names, rv));
}

/* ---- small encodings: hex, base64/PEM, the DER of a certificate ----------------------------- */

static void print_hex(const CK_BYTE *p, CK_ULONG len) {
    for (CK_ULONG i = 0; i < len; i++) {
        printf("%02x", p[i]);
    }
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* A certificate (DER) as PEM, 64 characters a line (malloc'ed, NUL-terminated; NULL when out of
 * memory). */
static char *der_to_pem(const CK_BYTE *der, size_t len) {
    static const char head[] = "-----BEGIN CERTIFICATE-----\n";
    static const char tail[] = "-----END CERTIFICATE-----\n";
    size_t chars = (len + 2) / 3 * 4;
    char *pem = malloc(sizeof head + chars + chars / 64 + 1 + sizeof tail);
    if (pem == NULL) {
        return NULL;
    }
    char *o = pem + strlen(strcpy(pem, head));
    size_t line = 0;
    for (size_t i = 0; i < len; i += 3) {
        unsigned long v = (unsigned long)der[i] << 16;
        v |= i + 1 < len ? (unsigned long)der[i + 1] << 8 : 0;
        v |= i + 2 < len ? der[i + 2] : 0;
        *o++ = b64[(v >> 18) & 63];
        *o++ = b64[(v >> 12) & 63];
        *o++ = i + 1 < len ? b64[(v >> 6) & 63] : '=';
        *o++ = i + 2 < len ? b64[v & 63] : '=';
        if ((line += 4) == 64) {
            *o++ = '\n';
            line = 0;
        }
    }
    if (line != 0) {
        *o++ = '\n';
    }
    strcpy(o, tail);
    return pem;
}

/* The DER of the first certificate in `pem` (malloc'ed into *der). 0 or -1. */
static int pem_to_der(const char *pem, CK_BYTE **der, size_t *len) {
    static const char head[] = "-----BEGIN CERTIFICATE-----", tail[] = "-----END CERTIFICATE-----";
    const char *p = strstr(pem, head);
    const char *end = p ? strstr(p, tail) : NULL;
    if (end == NULL) {
        return -1;
    }
    p += strlen(head);
    CK_BYTE *out = malloc((size_t)(end - p) / 4 * 3 + 3);
    if (out == NULL) {
        return -1;
    }
    size_t n = 0;
    unsigned long acc = 0;
    int bits = 0;
    for (; p < end; p++) {
        const char *c = *p ? strchr(b64, *p) : NULL;
        if (c == NULL) {
            continue; /* line breaks and the '=' padding */
        }
        acc = (acc << 6) | (unsigned long)(c - b64);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (CK_BYTE)(acc >> bits);
        }
    }
    *der = out;
    *len = n;
    return 0;
}

/* One DER element at *p (before `end`): its tag, its contents [*body, *body + *len); *p moves
 * past it. 0 or -1. */
static int der_element(const CK_BYTE **p, const CK_BYTE *end, CK_BYTE *tag, const CK_BYTE **body,
                       size_t *len) {
    const CK_BYTE *q = *p;
    if (end - q < 2) {
        return -1;
    }
    *tag = *q++;
    size_t n = *q++;
    if (n & 0x80) {
        size_t bytes = n & 0x7f;
        if (bytes == 0 || bytes > 3 || (size_t)(end - q) < bytes) {
            return -1;
        }
        for (n = 0; bytes > 0; bytes--) {
            n = (n << 8) | *q++;
        }
    }
    if ((size_t)(end - q) < n) {
        return -1;
    }
    *body = q;
    *len = n;
    *p = q + n;
    return 0;
}

/* The subject Name (its whole DER element, for CKA_SUBJECT) of a certificate: Certificate ::=
 * SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
 * validity, subject, ... }, ... }. 0 or -1. */
static int der_subject(const CK_BYTE *der, size_t len, const CK_BYTE **subject, size_t *out_len) {
    const CK_BYTE *p = der, *body = NULL;
    CK_BYTE tag = 0;
    size_t n = 0;
    if (der_element(&p, der + len, &tag, &body, &n) != 0 || tag != 0x30) {
        return -1; /* Certificate */
    }
    p = body;
    if (der_element(&p, body + n, &tag, &body, &n) != 0 || tag != 0x30) {
        return -1; /* tbsCertificate */
    }
    const CK_BYTE *end = body + n, *start = NULL;
    p = body;
    if (p < end && *p == 0xa0 && der_element(&p, end, &tag, &body, &n) != 0) {
        return -1; /* [0] version */
    }
    for (int field = 0; field < 5; field++) { /* serial, signature, issuer, validity, subject */
        start = p;
        if (der_element(&p, end, &tag, &body, &n) != 0) {
            return -1;
        }
    }
    if (tag != 0x30) {
        return -1;
    }
    *subject = start;
    *out_len = (size_t)(p - start);
    return 0;
}

/* The whole of a (small) text file, NUL-terminated (malloc'ed), or NULL (message printed). */
static char *read_text_file(const char *path) {
    FILE *f = fopen(path, "r");
    char *text = f ? malloc(65536) : NULL;
    size_t n = text ? fread(text, 1, 65535, f) : 0;
    int ok = text != NULL && !ferror(f) && feof(f);
    if (f != NULL) {
        fclose(f);
    }
    if (!ok) {
        free(text);
        fprintf(stderr, PROG ": cannot read %s (or it is over 64 KiB)\n", path);
        printf("result=storage\nerror=cannot read %s\n", path);
        return NULL;
    }
    text[n] = '\0';
    return text;
}

/* ---- the token ------------------------------------------------------------------------------ */

/* The module and the one session this program uses. The library calls the signing callbacks
 * on the thread that called fleetprov_provision() (main()'s), one at a time, so the session is
 * never used by two threads at once. (A PKCS#11 session belongs to one thread at a time:
 * firmware signing from several threads opens a session per thread.) */
struct token {
    void *library;            /* dlopen() handle of the module */
    CK_FUNCTION_LIST_PTR p11; /* its functions: every call goes through this table */
    int initialized;          /* C_Initialize succeeded */
    int have_session;
    CK_SESSION_HANDLE session;
    int logged_in;
};

/* Loads the module, finds the token labelled `label`, opens a read-write session and logs in.
 * 0 or -1 (reported). */
static int token_open(struct token *t, const char *module, const char *label, const char *pin) {
    /* RTLD_LOCAL: the module's own symbols (it may bring its own OpenSSL) stay its own. */
    t->library = dlopen(module, RTLD_NOW | RTLD_LOCAL);
    if (t->library == NULL) {
        const char *why = dlerror();
        pkcs11_failure("dlopen", why ? why : module);
        return -1;
    }
    /* The one symbol looked up by name: it returns the table of all the others. (memcpy: ISO C
     * has no conversion from the object pointer dlsym() returns to a function pointer.) */
    CK_C_GetFunctionList get_function_list = NULL;
    void *sym = dlsym(t->library, "C_GetFunctionList");
    if (sym == NULL) {
        pkcs11_failure("dlsym", "the module has no C_GetFunctionList: not a PKCS#11 module");
        return -1;
    }
    memcpy(&get_function_list, &sym, sizeof get_function_list);
    CK_RV rv = get_function_list(&t->p11);
    if (rv != CKR_OK) {
        ck_failure("C_GetFunctionList", rv);
        return -1;
    }
    /* CKF_OS_LOCKING_OK: the module may be called from more than one thread of this process
     * (the library runs its own threads) and should use the OS's locks. */
    CK_C_INITIALIZE_ARGS init;
    memset(&init, 0, sizeof init);
    init.flags = CKF_OS_LOCKING_OK;
    rv = t->p11->C_Initialize(&init);
    if (rv != CKR_OK) {
        ck_failure("C_Initialize", rv);
        return -1;
    }
    t->initialized = 1;

    /* The slots with a token in them; the one whose token label (32 bytes, blank-padded, not
     * NUL-terminated) is `label`. */
    CK_ULONG count = 0;
    rv = t->p11->C_GetSlotList(CK_TRUE, NULL, &count);
    CK_SLOT_ID *slots = rv == CKR_OK ? calloc(count + 1, sizeof *slots) : NULL;
    if (rv == CKR_OK && slots == NULL) {
        rv = CKR_HOST_MEMORY;
    }
    if (rv == CKR_OK) {
        rv = t->p11->C_GetSlotList(CK_TRUE, slots, &count);
    }
    if (rv != CKR_OK) {
        free(slots);
        ck_failure("C_GetSlotList", rv);
        return -1;
    }
    CK_SLOT_ID slot = 0;
    int found = 0;
    char padded[sizeof ((CK_TOKEN_INFO *)0)->label];
    size_t label_len = strlen(label);
    memset(padded, ' ', sizeof padded);
    memcpy(padded, label, label_len < sizeof padded ? label_len : sizeof padded);
    for (CK_ULONG i = 0; i < count && !found; i++) {
        CK_TOKEN_INFO info;
        if (t->p11->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
            memcmp(info.label, padded, sizeof padded) == 0) {
            slot = slots[i];
            found = 1;
        }
    }
    free(slots);
    if (!found || label_len > sizeof padded) {
        char detail[128];
        snprintf(detail, sizeof detail, "no token labelled \"%.32s\" (%lu slots with a token)",
                 label, (unsigned long)count);
        pkcs11_failure("C_GetTokenInfo", detail);
        return -1;
    }
    rv = t->p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &t->session);
    if (rv != CKR_OK) {
        ck_failure("C_OpenSession", rv);
        return -1;
    }
    t->have_session = 1;
    /* The user PIN unlocks the private objects (the keys) for this session. A wrong one is
     * CKR_PIN_INCORRECT; the PIN itself is never printed. */
    rv = t->p11->C_Login(t->session, CKU_USER, (CK_UTF8CHAR_PTR)pin, (CK_ULONG)strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        ck_failure("C_Login", rv);
        return -1;
    }
    t->logged_in = 1;
    return 0;
}

static void token_close(struct token *t) {
    if (t->logged_in) {
        t->p11->C_Logout(t->session);
    }
    if (t->have_session) {
        t->p11->C_CloseSession(t->session);
    }
    if (t->initialized) {
        t->p11->C_Finalize(NULL);
    }
    if (t->library != NULL) {
        dlclose(t->library);
    }
    memset(t, 0, sizeof *t);
}

/* The handles of up to `max` objects matching the class (NULL: any), the label (NULL: any) and
 * the CKA_ID (NULL: any); the number found in *count. A CK_RV. */
static CK_RV find_objects(struct token *t, const CK_OBJECT_CLASS *cls, const char *label,
                          const CK_BYTE *id, CK_ULONG id_len, CK_OBJECT_HANDLE *out, CK_ULONG max,
                          CK_ULONG *count) {
    CK_ATTRIBUTE match[3];
    CK_ULONG n = 0;
    if (cls != NULL) {
        match[n++] = (CK_ATTRIBUTE){CKA_CLASS, (void *)cls, sizeof *cls};
    }
    if (label != NULL) {
        match[n++] = (CK_ATTRIBUTE){CKA_LABEL, (void *)label, (CK_ULONG)strlen(label)};
    }
    if (id != NULL) {
        match[n++] = (CK_ATTRIBUTE){CKA_ID, (void *)id, id_len};
    }
    *count = 0;
    CK_RV rv = t->p11->C_FindObjectsInit(t->session, match, n);
    if (rv != CKR_OK) {
        return rv;
    }
    rv = t->p11->C_FindObjects(t->session, out, max, count);
    CK_RV final = t->p11->C_FindObjectsFinal(t->session); /* always, to end the search */
    return rv != CKR_OK ? rv : final;
}

/* The one object of class `cls` labelled `label`: 1 (in *out), 0 when there is none, -1 on
 * failure or when there are several (reported). `what` names it in messages. */
static int find_one(struct token *t, CK_OBJECT_CLASS cls, const char *label, const char *what,
                    CK_OBJECT_HANDLE *out) {
    CK_OBJECT_HANDLE found[2];
    CK_ULONG count = 0;
    CK_RV rv = find_objects(t, &cls, label, NULL, 0, found, 2, &count);
    if (rv != CKR_OK) {
        ck_failure("C_FindObjects", rv);
        return -1;
    }
    if (count > 1) {
        char detail[256];
        snprintf(detail, sizeof detail, "more than one %s labelled \"%s\"", what, label);
        pkcs11_failure("C_FindObjects", detail);
        return -1;
    }
    *out = found[0];
    return count == 1;
}

/* The value of attribute `type` of `obj` (malloc'ed into *value, with a NUL after it). A CK_RV:
 * CKR_ATTRIBUTE_SENSITIVE for a value the token does not give out (a private key's). */
static CK_RV get_attribute(struct token *t, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type,
                           CK_BYTE **value, CK_ULONG *len) {
    CK_ATTRIBUTE a = {type, NULL, 0};
    *value = NULL;
    CK_RV rv = t->p11->C_GetAttributeValue(t->session, obj, &a, 1); /* first: the length */
    if (rv != CKR_OK) {
        return rv;
    }
    if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > (1ul << 20)) {
        return CKR_ATTRIBUTE_SENSITIVE;
    }
    a.pValue = calloc(1, a.ulValueLen + 1);
    if (a.pValue == NULL) {
        return CKR_HOST_MEMORY;
    }
    rv = t->p11->C_GetAttributeValue(t->session, obj, &a, 1); /* then the value */
    if (rv != CKR_OK) {
        free(a.pValue);
        return rv;
    }
    *value = a.pValue;
    *len = a.ulValueLen;
    return CKR_OK;
}

/* A CK_ULONG attribute (CKA_CLASS, CKA_KEY_TYPE, ...). */
static CK_RV get_ulong(struct token *t, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type,
                       CK_ULONG *out) {
    CK_ATTRIBUTE a = {type, out, sizeof *out};
    return t->p11->C_GetAttributeValue(t->session, obj, &a, 1);
}

/* SHA-256 of `data`, by the token (CKM_SHA256), as 64 lowercase hex digits: the certificate
 * id of a certificate's DER. 0 or -1 (reported). */
static int sha256_hex(struct token *t, const CK_BYTE *data, CK_ULONG len, char hex[65]) {
    CK_MECHANISM sha256 = {CKM_SHA256, NULL, 0};
    CK_BYTE digest[32];
    CK_ULONG digest_len = sizeof digest;
    CK_RV rv = t->p11->C_DigestInit(t->session, &sha256);
    if (rv == CKR_OK) {
        rv = t->p11->C_Digest(t->session, (CK_BYTE_PTR)data, len, digest, &digest_len);
    }
    if (rv != CKR_OK || digest_len != sizeof digest) {
        ck_failure("C_Digest", rv);
        return -1;
    }
    for (int i = 0; i < 32; i++) {
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    }
    return 0;
}

/* ---- keys ----------------------------------------------------------------------------------- */

/* A private key in the token and what signing with it takes. The userdata of the signing
 * callbacks (main() owns it; it outlives the config). */
enum breakage { SIGN_OK, SIGN_FAIL, SIGN_WRONG };

struct signer {
    struct token *token;
    const char *role;       /* "claim key", "device key": for messages */
    CK_OBJECT_HANDLE key;   /* the private key object: only a handle, never its value */
    CK_KEY_TYPE type;       /* CKK_EC or CKK_RSA */
    enum breakage breakage; /* the test aid --break-signer */
    unsigned calls;
};

/* The device's key pair: what the library needs to know of it. */
struct device_key {
    CK_OBJECT_HANDLE private_key;
    CK_BYTE id[64];    /* CKA_ID, shared by the two halves and the certificate */
    CK_ULONG id_len;
    CK_BYTE point[65]; /* the public key: the uncompressed point 04 || X || Y of P-256 */
    int generated;     /* made by this run (else found in the token) */
};

/* The claim key (or, rotating, the current device key): the private key labelled `label`,
 * which must be EC on P-256 or P-384, or RSA. 0 or -1 (reported). */
static int find_signing_key(struct token *t, const char *label, struct signer *s) {
    int found = find_one(t, CKO_PRIVATE_KEY, label, "private key", &s->key);
    if (found <= 0) {
        if (found == 0) {
            char detail[256];
            snprintf(detail, sizeof detail, "no private key labelled \"%s\" (the %s)", label,
                     s->role);
            pkcs11_failure("C_FindObjects", detail);
        }
        return -1;
    }
    CK_RV rv = get_ulong(t, s->key, CKA_KEY_TYPE, &s->type);
    if (rv != CKR_OK) {
        ck_failure("C_GetAttributeValue", rv);
        return -1;
    }
    int supported = s->type == CKK_RSA;
    if (s->type == CKK_EC) {
        /* An EC private key carries its curve (CKA_EC_PARAMS), not its public point. */
        CK_BYTE *params = NULL;
        CK_ULONG len = 0;
        rv = get_attribute(t, s->key, CKA_EC_PARAMS, &params, &len);
        if (rv != CKR_OK) {
            ck_failure("C_GetAttributeValue", rv);
            return -1;
        }
        supported = (len == sizeof OID_P256 && memcmp(params, OID_P256, len) == 0) ||
                    (len == sizeof OID_P384 && memcmp(params, OID_P384, len) == 0);
        free(params);
    }
    if (!supported) {
        char detail[256];
        snprintf(detail, sizeof detail,
                 "the %s \"%s\" is %s%s: not supported (EC P-256 or P-384, or RSA)", s->role,
                 label, LOOKUP(key_type_names, s->type),
                 s->type == CKK_EC ? " on another curve" : "");
        pkcs11_failure("C_GetAttributeValue", detail);
        return -1;
    }
    return 0;
}

/* Generates the device key pair INSIDE the token: EC P-256, stored on the token (CKA_TOKEN),
 * usable for signing only after login (CKA_PRIVATE), never given out (CKA_SENSITIVE, not
 * CKA_EXTRACTABLE). Both halves get `label` and a random CKA_ID. 0 or -1 (reported). */
static int generate_key_pair(struct token *t, const char *label, struct device_key *k,
                             CK_OBJECT_HANDLE *public_key) {
    CK_RV rv = t->p11->C_GenerateRandom(t->session, k->id, 16);
    if (rv != CKR_OK) {
        ck_failure("C_GenerateRandom", rv);
        return -1;
    }
    k->id_len = 16;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ULONG label_len = (CK_ULONG)strlen(label);
    CK_ATTRIBUTE public_template[] = {
        {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &no, sizeof no},
        {CKA_VERIFY, &yes, sizeof yes},
        {CKA_EC_PARAMS, (void *)OID_P256, sizeof OID_P256},
        {CKA_LABEL, (void *)label, label_len},
        {CKA_ID, k->id, k->id_len},
    };
    CK_ATTRIBUTE private_template[] = {
        {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_SIGN, &yes, sizeof yes},
        {CKA_LABEL, (void *)label, label_len},
        {CKA_ID, k->id, k->id_len},
    };
    CK_MECHANISM keygen = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    rv = t->p11->C_GenerateKeyPair(
        t->session, &keygen, public_template, sizeof public_template / sizeof public_template[0],
        private_template, sizeof private_template / sizeof private_template[0], public_key,
        &k->private_key);
    if (rv != CKR_OK) {
        ck_failure("C_GenerateKeyPair", rv);
        return -1;
    }
    k->generated = 1;
    fprintf(stderr, PROG ": generated the device key pair \"%s\" in the token\n", label);
    return 0;
}

/* The device key pair labelled `label`, generated first if the token has none. Reads its
 * CKA_ID and its public point. 0 or -1 (reported). */
static int device_key(struct token *t, const char *label, struct device_key *k) {
    CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
    memset(k, 0, sizeof *k);
    int have_private = find_one(t, CKO_PRIVATE_KEY, label, "private key", &k->private_key);
    int have_public = have_private < 0 ? -1
                                       : find_one(t, CKO_PUBLIC_KEY, label, "public key",
                                                  &public_key);
    if (have_private < 0 || have_public < 0) {
        return -1;
    }
    if (!have_private && !have_public) {
        if (generate_key_pair(t, label, k, &public_key) != 0) {
            return -1;
        }
        have_private = have_public = 1;
    }
    if (!have_private || !have_public) {
        char detail[256];
        snprintf(detail, sizeof detail, "only half a key pair labelled \"%s\" (no %s key)", label,
                 have_private ? "public" : "private");
        pkcs11_failure("C_FindObjects", detail);
        return -1;
    }
    /* CKA_ID of the private key: the certificate will carry it too. */
    CK_BYTE *value = NULL;
    CK_ULONG len = 0;
    CK_RV rv = get_attribute(t, k->private_key, CKA_ID, &value, &len);
    if (rv == CKR_OK && len <= sizeof k->id) {
        memcpy(k->id, value, len);
        k->id_len = len;
    }
    free(value);
    if (rv != CKR_OK) {
        ck_failure("C_GetAttributeValue", rv);
        return -1;
    }
    /* The curve must be P-256 (the library makes its CSR for P-256 or P-384; this program
     * generates P-256). */
    rv = get_attribute(t, public_key, CKA_EC_PARAMS, &value, &len);
    int p256 = rv == CKR_OK && len == sizeof OID_P256 && memcmp(value, OID_P256, len) == 0;
    free(value);
    if (!p256) {
        if (rv != CKR_OK) {
            ck_failure("C_GetAttributeValue", rv);
        } else {
            pkcs11_failure("C_GetAttributeValue", "the device key is not EC P-256");
        }
        return -1;
    }
    /* CKA_EC_POINT is the DER of an OCTET STRING around the point: 04 41 | 04 X Y. (A few tokens
     * give the bare point: 04 X Y.) */
    rv = get_attribute(t, public_key, CKA_EC_POINT, &value, &len);
    const CK_BYTE *point = NULL;
    if (rv == CKR_OK && len == 67 && value[0] == 0x04 && value[1] == 65 && value[2] == 0x04) {
        point = value + 2;
    } else if (rv == CKR_OK && len == 65 && value[0] == 0x04) {
        point = value;
    }
    if (point != NULL) {
        memcpy(k->point, point, sizeof k->point);
    }
    free(value);
    if (point == NULL) {
        if (rv != CKR_OK) {
            ck_failure("C_GetAttributeValue", rv);
        } else {
            pkcs11_failure("C_GetAttributeValue", "CKA_EC_POINT is not an uncompressed point");
        }
        return -1;
    }
    return 0;
}

/* ---- signing: the two callbacks ------------------------------------------------------------- */

/* One signature by the token: C_SignInit with `mechanism` and the key, then C_Sign over
 * `data`. `signature` has room for *signature_len bytes; the length is written back. */
static int32_t token_sign(struct signer *s, CK_MECHANISM *mechanism, const uint8_t *data,
                          size_t len, uint8_t *signature, size_t *signature_len) {
    s->calls++;
    if (s->breakage == SIGN_FAIL) {
        fprintf(stderr, PROG ": the %s's signer fails (--break-signer fail)\n", s->role);
        return -1;
    }
    struct token *t = s->token;
    CK_ULONG out_len = (CK_ULONG)*signature_len;
    CK_RV rv = t->p11->C_SignInit(t->session, mechanism, s->key);
    if (rv == CKR_OK) {
        rv = t->p11->C_Sign(t->session, (CK_BYTE_PTR)data, (CK_ULONG)len, signature, &out_len);
    }
    if (rv != CKR_OK) {
        /* The library turns the failure into FLEETPROV_SIGNER; say which CKR it was. */
        fprintf(stderr, PROG ": C_Sign with the %s: %s\n", s->role, LOOKUP(ckr_names, rv));
        return -1;
    }
    if (s->breakage == SIGN_WRONG && out_len > 0) {
        signature[out_len - 1] ^= 0x01; /* still the right length, no longer valid */
        fprintf(stderr, PROG ": the %s's signer signs wrong (--break-signer wrong)\n", s->role);
    }
    *signature_len = (size_t)out_len;
    return 0;
}

/* fleetprov_tls_sign_callback for the claim key: one signature per TLS handshake made with the
 * claim certificate. The scheme follows from the key's type (and, for RSA, the TLS version):
 *   ECDSA       CKM_ECDSA over the digest; the token returns raw r || s, which the library
 *               takes as it is
 *   RSA-PSS     CKM_SHA256_RSA_PKCS_PSS over the message (SHA-256, MGF1-SHA-256, 32-byte salt)
 *   RSA PKCS#1  CKM_SHA256_RSA_PKCS over the message
 * Runs on the thread that called fleetprov_provision(); every pointer lives for the call only. */
static int32_t sign_tls(void *userdata, fleetprov_signature_scheme scheme, const uint8_t *message,
                        size_t message_len, const uint8_t *digest, size_t digest_len,
                        uint8_t *signature, size_t *signature_len) {
    struct signer *s = userdata;
    CK_RSA_PKCS_PSS_PARAMS pss = {CKM_SHA256, CKG_MGF1_SHA256, 32};
    CK_MECHANISM mechanism = {CKM_ECDSA, NULL, 0};
    switch (scheme) {
    case FLEETPROV_SIGNATURE_ECDSA_P256_SHA256:
    case FLEETPROV_SIGNATURE_ECDSA_P384_SHA384:
        return token_sign(s, &mechanism, digest, digest_len, signature, signature_len);
    case FLEETPROV_SIGNATURE_RSA_PSS_SHA256:
        mechanism.mechanism = CKM_SHA256_RSA_PKCS_PSS;
        mechanism.pParameter = &pss;
        mechanism.ulParameterLen = sizeof pss;
        return token_sign(s, &mechanism, message, message_len, signature, signature_len);
    case FLEETPROV_SIGNATURE_RSA_PKCS1_SHA256:
        mechanism.mechanism = CKM_SHA256_RSA_PKCS;
        return token_sign(s, &mechanism, message, message_len, signature, signature_len);
    default:
        fprintf(stderr, PROG ": unknown signature scheme %d\n", (int)scheme);
        return -1;
    }
}

/* fleetprov_sign_callback for the device key: ECDSA P-256 over the SHA-256 digest the library
 * computed (CKM_ECDSA), for the CSR and for the verification connection's handshake. */
static int32_t sign_device(void *userdata, const uint8_t *message, size_t message_len,
                           const uint8_t *digest, size_t digest_len, uint8_t *signature,
                           size_t *signature_len) {
    (void)message;
    (void)message_len;
    CK_MECHANISM ecdsa = {CKM_ECDSA, NULL, 0};
    return token_sign(userdata, &ecdsa, digest, digest_len, signature, signature_len);
}

/* ---- certificates in the token -------------------------------------------------------------- */

/* The DER of the certificate object labelled `label` (malloc'ed into *der): 1, 0 when there is
 * none, -1 on failure (reported). */
static int read_certificate(struct token *t, const char *label, CK_BYTE **der, CK_ULONG *len) {
    CK_OBJECT_HANDLE cert;
    int found = find_one(t, CKO_CERTIFICATE, label, "certificate", &cert);
    if (found <= 0) {
        return found;
    }
    CK_RV rv = get_attribute(t, cert, CKA_VALUE, der, len); /* a certificate's value is public */
    if (rv != CKR_OK) {
        ck_failure("C_GetAttributeValue", rv);
        return -1;
    }
    return 1;
}

/* Stores `der` as an X.509 certificate object on the token, labelled `label`, with the CKA_ID of
 * its key, replacing any older certificate with that label (removed only once the new one is
 * in). 0 or -1 (reported). */
static int store_certificate(struct token *t, const char *label, const CK_BYTE *id,
                             CK_ULONG id_len, const CK_BYTE *der, size_t der_len) {
    CK_OBJECT_CLASS cls = CKO_CERTIFICATE;
    CK_OBJECT_HANDLE older[8];
    CK_ULONG n_older = 0;
    CK_RV rv = find_objects(t, &cls, label, NULL, 0, older, 8, &n_older);
    if (rv != CKR_OK) {
        ck_failure("C_FindObjects", rv);
        return -1;
    }
    CK_CERTIFICATE_TYPE x509 = CKC_X_509;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE cert[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_CERTIFICATE_TYPE, &x509, sizeof x509},
        {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &no, sizeof no},
        {CKA_LABEL, (void *)label, (CK_ULONG)strlen(label)},
        {CKA_ID, (void *)id, id_len},
        {CKA_VALUE, (void *)der, (CK_ULONG)der_len},
        {CKA_SUBJECT, NULL, 0}, /* filled below when the DER can be read */
    };
    CK_ULONG n = sizeof cert / sizeof cert[0];
    const CK_BYTE *subject = NULL;
    size_t subject_len = 0;
    if (der_subject(der, der_len, &subject, &subject_len) == 0) {
        cert[n - 1].pValue = (void *)subject;
        cert[n - 1].ulValueLen = (CK_ULONG)subject_len;
    } else {
        n--;
    }
    CK_OBJECT_HANDLE created;
    rv = t->p11->C_CreateObject(t->session, cert, n, &created);
    if (rv != CKR_OK) {
        ck_failure("C_CreateObject", rv);
        return -1;
    }
    for (CK_ULONG i = 0; i < n_older; i++) {
        rv = t->p11->C_DestroyObject(t->session, older[i]);
        if (rv != CKR_OK) {
            ck_failure("C_DestroyObject", rv);
            return -1;
        }
    }
    return 0;
}

/* The end of a rotation: when a certificate labelled `next` (the new key's) is in the token,
 * destroys the objects labelled `label` of another CKA_ID (the old key pair and certificate),
 * then relabels the `next` objects `label`: the private key, the public key, and the
 * certificate last, so that an interrupted run leaves it for the next one to finish. 1 when it
 * switched, 0 when there was nothing to do, -1 on failure (reported). */
static int finish_rotation(struct token *t, const char *label, const char *next) {
    CK_OBJECT_HANDLE cert;
    int found = find_one(t, CKO_CERTIFICATE, next, "certificate", &cert);
    if (found <= 0) {
        return found;
    }
    CK_BYTE *new_id = NULL;
    CK_ULONG new_id_len = 0;
    CK_RV rv = get_attribute(t, cert, CKA_ID, &new_id, &new_id_len);
    if (rv != CKR_OK) {
        ck_failure("C_GetAttributeValue", rv);
        return -1;
    }
    CK_OBJECT_HANDLE objects[16];
    CK_ULONG count = 0;
    rv = find_objects(t, NULL, label, NULL, 0, objects, 16, &count);
    for (CK_ULONG i = 0; rv == CKR_OK && i < count; i++) {
        CK_BYTE *id = NULL;
        CK_ULONG id_len = 0;
        rv = get_attribute(t, objects[i], CKA_ID, &id, &id_len);
        int same = rv == CKR_OK && id_len == new_id_len && memcmp(id, new_id, id_len) == 0;
        free(id);
        if (rv == CKR_OK && !same) {
            rv = t->p11->C_DestroyObject(t->session, objects[i]);
        }
    }
    free(new_id);
    if (rv != CKR_OK) {
        ck_failure("C_DestroyObject", rv);
        return -1;
    }
    const CK_OBJECT_CLASS order[] = {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_CERTIFICATE};
    CK_ATTRIBUTE relabel = {CKA_LABEL, (void *)label, (CK_ULONG)strlen(label)};
    for (size_t c = 0; c < 3; c++) {
        rv = find_objects(t, &order[c], next, NULL, 0, objects, 16, &count);
        for (CK_ULONG i = 0; rv == CKR_OK && i < count; i++) {
            rv = t->p11->C_SetAttributeValue(t->session, objects[i], &relabel, 1);
        }
        if (rv != CKR_OK) {
            ck_failure("C_SetAttributeValue", rv);
            return -1;
        }
    }
    fprintf(stderr, PROG ": the rotated key pair and certificate are now \"%s\"\n", label);
    return 1;
}

/* ---- --show --------------------------------------------------------------------------------- */

static void show_bool(struct token *t, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type,
                      const char *name) {
    CK_BBOOL v = CK_FALSE;
    CK_ATTRIBUTE a = {type, &v, sizeof v};
    if (t->p11->C_GetAttributeValue(t->session, obj, &a, 1) == CKR_OK) {
        printf(" %s=%d", name, v ? 1 : 0);
    }
}

/* One object= line per object: class, label, CKA_ID and public attributes only. */
static int show(struct token *t) {
    CK_OBJECT_HANDLE objects[64];
    CK_ULONG count = 0;
    CK_RV rv = find_objects(t, NULL, NULL, NULL, 0, objects, 64, &count);
    if (rv != CKR_OK) {
        ck_failure("C_FindObjects", rv);
        return 1;
    }
    for (CK_ULONG i = 0; i < count; i++) {
        CK_OBJECT_CLASS cls = 0;
        CK_BYTE *value = NULL;
        CK_ULONG len = 0;
        if (get_ulong(t, objects[i], CKA_CLASS, &cls) != CKR_OK) {
            continue;
        }
        printf("object=%s", LOOKUP(class_names, cls));
        if (get_attribute(t, objects[i], CKA_LABEL, &value, &len) == CKR_OK) {
            printf(" label=%s", (char *)value);
        }
        free(value);
        printf(" id=");
        if (get_attribute(t, objects[i], CKA_ID, &value, &len) == CKR_OK) {
            print_hex(value, len);
        }
        free(value);
        CK_KEY_TYPE type = 0;
        if ((cls == CKO_PRIVATE_KEY || cls == CKO_PUBLIC_KEY) &&
            get_ulong(t, objects[i], CKA_KEY_TYPE, &type) == CKR_OK) {
            printf(" key_type=%s", LOOKUP(key_type_names, type));
        }
        if (cls == CKO_PRIVATE_KEY) {
            show_bool(t, objects[i], CKA_SENSITIVE, "sensitive");
            show_bool(t, objects[i], CKA_EXTRACTABLE, "extractable");
            show_bool(t, objects[i], CKA_ALWAYS_SENSITIVE, "always_sensitive");
            show_bool(t, objects[i], CKA_NEVER_EXTRACTABLE, "never_extractable");
        } else if (cls == CKO_PUBLIC_KEY && type == CKK_EC &&
                   get_attribute(t, objects[i], CKA_EC_POINT, &value, &len) == CKR_OK) {
            printf(" ec_point=");
            print_hex(value, len);
            free(value);
        } else if (cls == CKO_CERTIFICATE &&
                   get_attribute(t, objects[i], CKA_VALUE, &value, &len) == CKR_OK) {
            char id[65];
            if (sha256_hex(t, value, len, id) == 0) {
                printf(" certificate_id=%s", id);
            }
            printf(" der=");
            print_hex(value, len);
            free(value);
        }
        printf("\n");
    }
    printf("objects=%lu\n", (unsigned long)count);
    return 0;
}

/* ---- main ----------------------------------------------------------------------------------- */

struct reporter {
    const char *stop_at; /* FLEETPROV_EXAMPLE_STOP_AT, or NULL */
};

static void on_progress(void *userdata, const fleetprov_progress *progress) {
    const struct reporter *rep = userdata;
    example_print_progress(PROG ":", progress);
    const char *name = example_step_name(progress->step);
    if (rep->stop_at != NULL && strcmp(rep->stop_at, name) == 0) {
        example_stop_here(PROG, name); /* the test aid */
    }
}

/* The PIN from --pin or the environment variable --pin-env names, or NULL (said why). */
static const char *pin_from(const char *pin, const char *pin_env) {
    if ((pin == NULL) == (pin_env == NULL)) {
        fprintf(stderr, PROG ": give the user PIN with --pin PIN or --pin-env VAR (one of them)\n");
        return NULL;
    }
    if (pin_env != NULL) {
        pin = getenv(pin_env);
        if (pin == NULL) {
            fprintf(stderr, PROG ": --pin-env %s: the variable is not set\n", pin_env);
        }
    }
    return pin;
}

/* --show --module PATH --token LABEL (--pin PIN | --pin-env VAR). */
static int show_main(int argc, char **argv) {
    const char *module = NULL, *token_label = NULL, *pin = NULL, *pin_env = NULL;
    for (int i = 1; i < argc; i++) {
        const char **slot = strcmp(argv[i], "--module") == 0    ? &module
                            : strcmp(argv[i], "--token") == 0   ? &token_label
                            : strcmp(argv[i], "--pin") == 0     ? &pin
                            : strcmp(argv[i], "--pin-env") == 0 ? &pin_env
                                                                : NULL;
        if (strcmp(argv[i], "--show") == 0) {
            continue;
        }
        if (slot == NULL || i + 1 == argc) {
            fprintf(stderr, "usage: %s --show --module PATH --token LABEL (--pin PIN | --pin-env "
                            "VAR)\n", argv[0]);
            return EXIT_USAGE;
        }
        *slot = argv[++i];
    }
    if (module == NULL || token_label == NULL) {
        fprintf(stderr, "%s: --show needs --module and --token\n", argv[0]);
        return EXIT_USAGE;
    }
    if ((pin = pin_from(pin, pin_env)) == NULL) {
        return EXIT_USAGE;
    }
    struct token token;
    memset(&token, 0, sizeof token);
    int status = token_open(&token, module, token_label, pin) == 0 ? show(&token) : 1;
    token_close(&token);
    return status;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--show") == 0) {
            return show_main(argc, argv);
        }
    }
    struct example_args args;
    const char *module = NULL, *token_label = NULL, *pin = NULL, *pin_env = NULL;
    const char *claim_label = "claim", *device_label = "device";
    const char *rotate_thing = NULL, *breakage = NULL, *stop_at = NULL;
    int reprovision = 0;
    const struct example_option options[] = {
        {"--module", "PKCS11_MODULE.so", &module, NULL},
        {"--token", "LABEL", &token_label, NULL},
        {"--pin", "PIN", &pin, NULL},
        {"--pin-env", "VAR", &pin_env, NULL},
        {"--claim-label", "LABEL", &claim_label, NULL},
        {"--device-label", "LABEL", &device_label, NULL},
        {"--rotate", "THING", &rotate_thing, NULL},
        {"--reprovision", NULL, NULL, &reprovision},
        {"--break-signer", "fail|wrong", &breakage, NULL},
        {"--show", NULL, NULL, NULL},
    };
    size_t n_options = sizeof options / sizeof options[0];
    if (example_parse_args_with(argc, argv, &args,
                                EXAMPLE_CLAIM_OPTIONAL | EXAMPLE_TEMPLATE_OPTIONAL, options,
                                n_options) != 0 ||
        example_stop_step_from_env(argv[0], &stop_at) != 0) {
        return EXIT_USAGE;
    }
    const char *usage_error = module == NULL        ? "--module is required"
                              : token_label == NULL ? "--token is required"
                              : args.key != NULL    ? "--key: the claim key is in the token "
                                                      "(--claim-label)"
                              : args.out_dir != NULL
                                  ? "--out: the certificate goes into the token, next to its key"
                              : args.template_name == NULL && rotate_thing == NULL
                                  ? "--template is required"
                              : breakage != NULL && strcmp(breakage, "fail") != 0 &&
                                      strcmp(breakage, "wrong") != 0
                                  ? "--break-signer wants fail or wrong"
                                  : NULL;
    if (usage_error != NULL) {
        fprintf(stderr, "%s: %s\n", argv[0], usage_error);
        example_usage(argv[0], options, n_options);
        return EXIT_USAGE;
    }
    if ((pin = pin_from(pin, pin_env)) == NULL) {
        return EXIT_USAGE;
    }
    /* The rotation's new key pair waits under this label until it takes over. */
    char next_label[256];
    if (snprintf(next_label, sizeof next_label, "%s-next", device_label) >=
        (int)sizeof next_label) {
        fprintf(stderr, "%s: --device-label is too long\n", argv[0]);
        return EXIT_USAGE;
    }

    int status = 1;
    struct token token;
    memset(&token, 0, sizeof token);
    struct signer claim = {&token, "claim key", CK_INVALID_HANDLE, 0, SIGN_OK, 0};
    struct signer device = {&token, "device key", CK_INVALID_HANDLE, CKK_EC, SIGN_OK, 0};
    if (breakage != NULL) {
        claim.breakage = strcmp(breakage, "fail") == 0 ? SIGN_FAIL : SIGN_WRONG;
    }
    struct device_key key;
    struct reporter rep = {stop_at};
    CK_BYTE *der = NULL;
    CK_ULONG der_len = 0;
    char *claim_pem = NULL;
    fleetprov_config *cfg = NULL;
    fleetprov_provisioned *p = NULL;

    /* 1. The token. */
    if (token_open(&token, module, token_label, pin) != 0) {
        goto out;
    }
    /* An earlier rotation that stored its certificate but died before the switch. */
    if (finish_rotation(&token, device_label, next_label) < 0) {
        goto out;
    }

    /* 2. Provisioned already? */
    if (rotate_thing == NULL && !reprovision) {
        int found = read_certificate(&token, device_label, &der, &der_len);
        char id[65];
        if (found < 0 || (found == 1 && sha256_hex(&token, der, der_len, id) != 0)) {
            goto out;
        }
        if (found == 1) {
            fprintf(stderr, PROG ": the token holds the certificate \"%s\": provisioned already\n",
                    device_label);
            printf("already_provisioned=1\ncertificate_id=%s\n", id);
            printf("resumed=0\nsignatures_claim=0\nsignatures_device=0\n");
            status = 0;
            goto out;
        }
    }

    /* 3. The claim credentials: the certificate (PEM) here, its key in the token. Rotating,
     * the device's current certificate and key take their place. */
    const char *claim_key_label = claim_label;
    if (rotate_thing != NULL || args.cert == NULL) {
        const char *cert_label = rotate_thing != NULL ? device_label : claim_label;
        int found = read_certificate(&token, cert_label, &der, &der_len);
        if (found == 0) {
            char detail[320];
            snprintf(detail, sizeof detail, "no certificate labelled \"%s\" in the token%s",
                     cert_label, rotate_thing != NULL ? ": provision first" : " and no --cert");
            pkcs11_failure("C_FindObjects", detail);
        }
        if (found != 1) {
            goto out;
        }
        claim_pem = der_to_pem(der, der_len);
        free(der);
        der = NULL;
        claim_key_label = cert_label;
        if (rotate_thing != NULL) {
            claim.role = "current device key";
        }
    } else {
        claim_pem = read_text_file(args.cert);
    }
    if (claim_pem == NULL) {
        goto out;
    }
    args.cert = NULL; /* example_config would take it as a claim certificate file */
    if (rotate_thing != NULL && args.template_name == NULL) {
        args.template_name = "RotationTemplate";
    }
    cfg = example_config(&args);
    if (cfg == NULL) {
        goto out;
    }
    /* `claim` outlives the config: no userdata_free. The library checks the certificate here:
     * a key type it cannot use (Ed25519, say) is FLEETPROV_INVALID_ARGUMENT, naming it. */
    const char *what = "fleetprov_config_set_claim_signer";
    fleetprov_result r = fleetprov_config_set_claim_signer(cfg, claim_pem, sign_tls, &claim, NULL);
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        goto out;
    }
    if (find_signing_key(&token, claim_key_label, &claim) != 0) {
        goto out;
    }

    /* 4. The device key pair, generated in the token unless an earlier run made it. */
    if (device_key(&token, rotate_thing != NULL ? next_label : device_label, &key) != 0) {
        goto out;
    }
    device.key = key.private_key;
    fprintf(stderr, PROG ": device key %s\n",
            key.generated ? "generated" : "found in the token (made by an earlier run)");
    /* The public point (65 bytes) is all the library learns of the key. Selects
     * FLEETPROV_METHOD_EXTERNAL_SIGNER. */
    what = "fleetprov_config_set_signer";
    r = fleetprov_config_set_signer(cfg, key.point, sizeof key.point, sign_device, &device, NULL);
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_progress_callback";
        r = fleetprov_config_set_progress_callback(cfg, on_progress, &rep, NULL);
    }
    if (r == FLEETPROV_OK && rotate_thing != NULL) {
        /* Rotating: connect as the thing, and name it to the rotation template. */
        what = "fleetprov_config_set_client_id";
        r = fleetprov_config_set_client_id(cfg, rotate_thing);
        if (r == FLEETPROV_OK) {
            what = "fleetprov_config_set_parameter";
            r = fleetprov_config_set_parameter(cfg, "ThingName", rotate_thing);
        }
    }

    /* 5. Provision; then the certificate goes into the token, next to its key. */
    if (r == FLEETPROV_OK) {
        what = "fleetprov_provision";
        r = fleetprov_provision(cfg, &p);
    }
    fprintf(stderr, PROG ": signatures: %u by the %s, %u by the device key\n", claim.calls,
            rotate_thing != NULL ? "current device key" : "claim key", device.calls);
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        printf("signatures_claim=%u\nsignatures_device=%u\n", claim.calls, device.calls);
        goto out;
    }
    size_t cert_len = 0;
    if (pem_to_der(fleetprov_provisioned_certificate_pem(p), &der, &cert_len) != 0) {
        fprintf(stderr, PROG ": the library returned no certificate PEM\n");
        goto out;
    }
    const char *stored_as = rotate_thing != NULL ? next_label : device_label;
    if (store_certificate(&token, stored_as, key.id, key.id_len, der, cert_len) != 0) {
        goto out;
    }
    if (rotate_thing != NULL && finish_rotation(&token, device_label, next_label) != 1) {
        goto out;
    }
    if (rotate_thing != NULL) {
        printf("rotated=1\n");
    }
    printf("already_provisioned=0\n");
    printf("thing_name=%s\n", fleetprov_provisioned_thing_name(p));
    printf("certificate_id=%s\n", fleetprov_provisioned_certificate_id(p));
    printf("attempts=%u\n", (unsigned)fleetprov_provisioned_attempts(p));
    printf("resumed=%d\n", fleetprov_provisioned_resumed(p) ? 1 : 0);
    printf("signatures_claim=%u\nsignatures_device=%u\n", claim.calls, device.calls);
    status = 0;
out:
    fleetprov_provisioned_free(p);
    fleetprov_config_free(cfg); /* the last user of `claim`, `device` and `rep` */
    free(claim_pem);
    free(der);
    token_close(&token);
    return status;
}
