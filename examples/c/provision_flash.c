/* provision_flash: the one-call flow (fleetprov_provision) with the resume journal and the
 * credentials kept in a store of the firmware's own (fleetprov_config_set_storage) instead of
 * the library's files: here an emulated raw NOR flash partition, one file standing for it.
 *
 *   provision_flash --flash PATH --endpoint HOST --port N --ca ca.pem --cert claim.pem \
 *       --key claim.key --template DemoTemplate --param SerialNumber=ABC123 \
 *       [--format json|cbor] [--method csr|keys] [--timeout MS] [--client-id ID] \
 *       [--no-verify] [--retry MAX,INITIAL_MS,MAX_MS] [--reprovision]
 *   provision_flash --show --flash PATH
 *   provision_flash --self-test --flash PATH
 *
 * Provisioning prints thing_name=, certificate_id=, flash=, attempts= and resumed=0|1 (and
 * already_provisioned=1 when the partition already held a complete set: nothing is sent then;
 * --reprovision makes a new certificate anyway) on success (exit 0); the result name, the
 * error text and a rejection's fields on failure (exit 1). Either way it ends with
 * flash_loads=, flash_stores=, flash_removes= and flash_load_retries= (loads the library had to
 * repeat with a bigger buffer). Steps, log lines and one line per flash operation (blob name,
 * size, slot, sequence number: never the content) go to stderr. Ctrl-C (SIGINT) or SIGTERM
 * cancels through fleetprov_cancel, keeping the journal in flash: run again to resume.
 *
 * --show reads the partition, without any network, and prints flash=, thing_name= and
 * certificate_id= (from the "device.json" blob), device_json=present|absent|invalid,
 * certificate_pem=, private_key= and journal=present|absent, invalid_slots=N (slots holding
 * neither erased flash nor a valid record: a write cut short) and complete=1|0. Exit 0 for a
 * complete set (device.json readable, certificate.pem and private.key present), 2 for none,
 * 1 when the partition cannot be read. --self-test exercises the store's callbacks directly on
 * a new partition at PATH (which must not exist): the load protocol's size retry,
 * replacement, tombstones, a write cut short, a corrupted record, a blob too big; it prints
 * self_test=ok.
 *
 * The partition (FLASH_PARTITION_SIZE bytes, created 0600 and erased, i.e. all 0xFF, when PATH
 * does not exist; any other size is refused) has two slots of FLASH_SLOT_SIZE bytes for each of
 * the library's four blob names: name i owns slots 2i and 2i+1. A slot holds one record:
 *
 *   offset  0  magic   u32  "FPF1" (0x31465046 little-endian)
 *           4  name    16 bytes, NUL-padded
 *          20  seq     u32  sequence number within the name: the larger is the newer
 *          24  flags   u32  0 data, 1 tombstone (a removed blob; length 0)
 *          28  length  u32  bytes of data after the header (at most FLASH_MAX_DATA)
 *          32  crc     u32  CRC-32 (IEEE 802.3, as zlib's crc32) of bytes 0..31 and the data
 *          36  data
 *
 * All integers little-endian, so the image reads the same on any CPU. A record is valid when
 * its magic, name, flags, length and CRC check out; anything else (erased flash, a record cut
 * short by a power loss) is ignored.
 * - load: the valid record with the highest sequence number; NOT_FOUND when there is none or it
 *   is a tombstone.
 * - store: the new record (sequence number one higher) goes to the slot NOT holding the newest
 *   valid record, is written whole (erase and program: one pwrite of the slot) and fsync()ed,
 *   then read back and checked. Until that write is complete the newest valid record is still
 *   the old one, so a crash or power loss at any point leaves the old content or the new: the
 *   atomicity fleetprov_storage asks for.
 * - remove: a tombstone the same way (none when the blob is already absent), then the slot
 *   with the removed data (or what a write cut short left) is erased: the journal holds the
 *   private key and the ownership token, which should not stay in flash once it is removed. A
 *   crash during that erase leaves the tombstone valid.
 * What a store replaces stays in the other slot until the next store of that name erases it
 * (the A/B scheme needs it until the new copy is complete); firmware that must not keep an old
 * private key anywhere encrypts the partition. Sequence numbers are 32 bits and never wrap: a
 * store after the last one fails (four billion stores of one name outlive any flash). One
 * process at a time per partition: the library takes no lock for a firmware store, and
 * neither does this example.
 *
 * Test aid, as in provision.c: FLEETPROV_EXAMPLE_STOP_AT=STEP (a step name: connecting, ...,
 * committed) freezes the progress callback at that step after printing "stopped_at=STEP", so
 * that a test can kill the process there. FLEETPROV_EXAMPLE_STOP_AT=store:NAME:N or
 * remove:NAME:N (NAME one of the four blob names, N from 1) emulates a power loss in the
 * middle of the Nth store (or remove) of NAME in this run instead: the target slot is erased,
 * the first half of the new record is written and fsync()ed, "stopped_at=store:NAME:N" is
 * printed and the process freezes inside the storage callback until it is killed
 * (examples/c/emu_test.py, the crash case). Not killed within 120 s, it exits with 3.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#define FLASH_SLOT_SIZE 8192u
#define FLASH_SLOTS_PER_NAME 2u
#define FLASH_NAME_COUNT 4u
#define FLASH_SLOTS (FLASH_SLOTS_PER_NAME * FLASH_NAME_COUNT)
#define FLASH_PARTITION_SIZE (FLASH_SLOTS * FLASH_SLOT_SIZE)
#define FLASH_MAGIC 0x31465046u /* "FPF1" in little-endian byte order */
#define FLASH_NAME_FIELD 16u
#define FLASH_HEADER_SIZE 36u
#define FLASH_MAX_DATA (FLASH_SLOT_SIZE - FLASH_HEADER_SIZE)
#define FLASH_TOMBSTONE 1u
#define FLASH_ERASED 0xFFu

/* Return values of the callbacks besides FLEETPROV_STORAGE_OK and _NOT_FOUND: any other value
 * is a failure to the library; distinct ones say which in a debugger. */
#define FLASH_FAILED_IO 2
#define FLASH_FAILED_NAME 3
#define FLASH_FAILED_TOO_BIG 4
#define FLASH_FAILED_VERIFY 5

_Static_assert(FLASH_SLOTS_PER_NAME == 2, "the A/B scheme below has two slots per name");
_Static_assert(FLASH_MAX_DATA < UINT32_MAX, "a length fits the header's u32");

/* The library's blob names (fleetprov_storage); blob i owns slots 2i and 2i+1. */
static const char *const blob_names[FLASH_NAME_COUNT] = {"journal", "private.key",
                                                          "certificate.pem", "device.json"};

enum slot_state { SLOT_ERASED, SLOT_INVALID, SLOT_VALID };

struct slot_info {
    enum slot_state state;
    uint32_t seq;
    uint32_t flags;
    uint32_t len;
};

/* The test aid's emulated power loss: the `count`th store (or remove) of blob `name`. */
struct tear {
    int is_remove;
    int name;       /* index into blob_names; -1: no tear */
    unsigned count; /* from 1 */
    unsigned seen;  /* operations of that kind on that name so far */
    char label[64]; /* "store:journal:2", as FLEETPROV_EXAMPLE_STOP_AT said */
};

/* The store: the userdata of the storage callbacks, owned by main() (registered without a
 * userdata_free; it outlives the config). The library calls one callback at a time per config
 * (fleetprov_storage), so nothing here is locked. */
struct flash {
    int fd;
    const char *path;
    struct tear tear;
    unsigned loads, stores, removes, load_retries;
    /* The two slots of one name; they hold keys and tokens: wiped after every call. */
    uint8_t scratch[FLASH_SLOTS_PER_NAME][FLASH_SLOT_SIZE];
};

/* ---- the test aid ----------------------------------------------------------------------- */

static int name_index(const char *name) {
    if (name == NULL) {
        return -1;
    }
    for (unsigned i = 0; i < FLASH_NAME_COUNT; i++) {
        if (strcmp(name, blob_names[i]) == 0) {
            return (int)i;
        }
    }
    return -1;
}

/* FLEETPROV_EXAMPLE_STOP_AT: a step name (written to *step) or store:NAME:N / remove:NAME:N
 * (written to *tear). A value that names neither is an error (a typo would never stop). */
static int stop_at_from_env(const char **step, struct tear *tear) {
    const char *v = getenv("FLEETPROV_EXAMPLE_STOP_AT");
    *step = NULL;
    memset(tear, 0, sizeof *tear);
    tear->name = -1;
    if (v == NULL || *v == '\0') {
        return 0;
    }
    for (int s = FLEETPROV_STEP_CONNECTING; s <= FLEETPROV_STEP_COMMITTED; s++) {
        if (strcmp(v, example_step_name((fleetprov_step)s)) == 0) {
            *step = v;
            return 0;
        }
    }
    const char *rest = NULL;
    if (strncmp(v, "store:", 6) == 0) {
        rest = v + 6;
    } else if (strncmp(v, "remove:", 7) == 0) {
        rest = v + 7;
        tear->is_remove = 1;
    }
    const char *colon = rest ? strrchr(rest, ':') : NULL;
    if (colon != NULL && strlen(v) < sizeof tear->label) {
        char name[FLASH_NAME_FIELD + 1];
        size_t n = (size_t)(colon - rest);
        char *end = NULL;
        errno = 0;
        unsigned long count = strtoul(colon + 1, &end, 10);
        if (n < sizeof name && colon[1] >= '1' && colon[1] <= '9' && errno == 0 &&
            *end == '\0' && count <= 1000) {
            memcpy(name, rest, n);
            name[n] = '\0';
            tear->name = name_index(name);
            tear->count = (unsigned)count;
            if (tear->name >= 0) {
                memcpy(tear->label, v, strlen(v) + 1);
                return 0;
            }
        }
    }
    fprintf(stderr, "provision_flash: FLEETPROV_EXAMPLE_STOP_AT=%s names no step and no "
                    "store:NAME:N or remove:NAME:N\n", v);
    return -1;
}

/* ---- the flash partition ---------------------------------------------------------------- */

/* CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), chainable like zlib's crc32(). */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n-- > 0) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++) {
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

static void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int pread_full(int fd, uint8_t *buf, size_t len, off_t at) {
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, at);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            if (n == 0) {
                errno = EIO; /* the partition is shorter than it was when opened */
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
        at += n;
    }
    return 0;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t len, off_t at) {
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, at);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            if (n == 0) {
                errno = EIO;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
        at += n;
    }
    return 0;
}

static off_t slot_offset(unsigned slot) {
    return (off_t)slot * (off_t)FLASH_SLOT_SIZE;
}

/* What slot image `raw` holds, for blob `name`. */
static struct slot_info classify(const uint8_t *raw, int name) {
    struct slot_info info = {SLOT_INVALID, 0, 0, 0};
    size_t erased = 0;
    while (erased < FLASH_SLOT_SIZE && raw[erased] == FLASH_ERASED) {
        erased++;
    }
    if (erased == FLASH_SLOT_SIZE) {
        info.state = SLOT_ERASED;
        return info;
    }
    char want[FLASH_NAME_FIELD] = {0};
    memcpy(want, blob_names[name], strlen(blob_names[name])); /* the longest is 15 bytes */
    uint32_t len = get_le32(raw + 28);
    uint32_t flags = get_le32(raw + 24);
    if (get_le32(raw) != FLASH_MAGIC || memcmp(raw + 4, want, FLASH_NAME_FIELD) != 0 ||
        len > FLASH_MAX_DATA || (flags != 0 && flags != FLASH_TOMBSTONE) ||
        (flags == FLASH_TOMBSTONE && len != 0)) {
        return info;
    }
    uint32_t crc = crc32_update(0, raw, 32);
    crc = crc32_update(crc, raw + FLASH_HEADER_SIZE, len);
    if (crc != get_le32(raw + 32)) {
        return info;
    }
    info.state = SLOT_VALID;
    info.seq = get_le32(raw + 20);
    info.flags = flags;
    info.len = len;
    return info;
}

/* Reads both slots of blob `name` into f->scratch and classifies them. 0 or -1 (printed). */
static int scan(struct flash *f, int name, struct slot_info info[FLASH_SLOTS_PER_NAME]) {
    for (unsigned k = 0; k < FLASH_SLOTS_PER_NAME; k++) {
        unsigned slot = (unsigned)name * FLASH_SLOTS_PER_NAME + k;
        if (pread_full(f->fd, f->scratch[k], FLASH_SLOT_SIZE, slot_offset(slot)) != 0) {
            fprintf(stderr, "flash: reading slot %u of %s: %s\n", slot, f->path, strerror(errno));
            return -1;
        }
        info[k] = classify(f->scratch[k], name);
    }
    return 0;
}

/* The slot (0 or 1 within the name) of the newest valid record, or -1. */
static int newest(const struct slot_info info[FLASH_SLOTS_PER_NAME]) {
    int best = -1;
    for (int k = 0; k < (int)FLASH_SLOTS_PER_NAME; k++) {
        if (info[k].state == SLOT_VALID && (best < 0 || info[k].seq > info[best].seq)) {
            best = k;
        }
    }
    return best;
}

static void wipe_scratch(struct flash *f) {
    example_wipe(f->scratch, sizeof f->scratch);
}

/* Builds a record of `len` bytes of `data` (a tombstone with `flags`) in `img`, padded with
 * erased bytes to a whole slot. Returns the record's length (header and data). */
static size_t build_record(uint8_t *img, int name, uint32_t seq, uint32_t flags,
                           const uint8_t *data, size_t len) {
    memset(img, FLASH_ERASED, FLASH_SLOT_SIZE);
    memset(img, 0, FLASH_HEADER_SIZE);
    put_le32(img, FLASH_MAGIC);
    memcpy(img + 4, blob_names[name], strlen(blob_names[name]));
    put_le32(img + 20, seq);
    put_le32(img + 24, flags);
    put_le32(img + 28, (uint32_t)len);
    if (len > 0) {
        memcpy(img + FLASH_HEADER_SIZE, data, len);
    }
    uint32_t crc = crc32_update(0, img, 32);
    crc = crc32_update(crc, img + FLASH_HEADER_SIZE, len);
    put_le32(img + 32, crc);
    return FLASH_HEADER_SIZE + len;
}

/* The test aid's power loss: erase the slot, program the first half of the record, make that
 * durable, freeze. Never returns. */
static void tear_and_stop(struct flash *f, unsigned slot, const uint8_t *img, size_t record) {
    uint8_t *ff = img == f->scratch[0] ? f->scratch[1] : f->scratch[0];
    memset(ff, FLASH_ERASED, FLASH_SLOT_SIZE);
    if (pwrite_full(f->fd, ff, FLASH_SLOT_SIZE, slot_offset(slot)) != 0 || fsync(f->fd) != 0 ||
        pwrite_full(f->fd, img, record / 2, slot_offset(slot)) != 0 || fsync(f->fd) != 0) {
        fprintf(stderr, "flash: emulating a power loss in slot %u: %s\n", slot, strerror(errno));
        _exit(4);
    }
    wipe_scratch(f);
    fprintf(stderr, "flash: power lost after %zu of %zu bytes of the record in slot %u\n",
            record / 2, record, slot);
    example_stop_here("provision_flash", f->tear.label);
}

/* Writes a record for blob `name` (data, or a tombstone) into the slot not holding the newest
 * valid record, durably, and checks it. f->scratch holds the name's slots (scan()). */
static int write_record(struct flash *f, int name, const struct slot_info info[],
                        uint32_t flags, const uint8_t *data, size_t len, int is_remove) {
    int cur = newest(info);
    if (cur >= 0 && info[cur].seq == UINT32_MAX) {
        /* A wrapped number would make the new record the older one: refuse, do not lose it. */
        fprintf(stderr, "flash: the sequence numbers of %s are used up\n", blob_names[name]);
        return FLASH_FAILED_IO;
    }
    unsigned k = cur < 0 ? 0u : (unsigned)(1 - cur);
    unsigned slot = (unsigned)name * FLASH_SLOTS_PER_NAME + k;
    uint32_t seq = cur < 0 ? 1u : info[cur].seq + 1u;
    uint8_t *img = f->scratch[k]; /* that slot's old image is not needed any more */
    size_t record = build_record(img, name, seq, flags, data, len);
    if (f->tear.name == name && f->tear.is_remove == is_remove &&
        ++f->tear.seen == f->tear.count) {
        tear_and_stop(f, slot, img, record);
    }
    if (pwrite_full(f->fd, img, FLASH_SLOT_SIZE, slot_offset(slot)) != 0 || fsync(f->fd) != 0) {
        fprintf(stderr, "flash: writing slot %u of %s: %s\n", slot, f->path, strerror(errno));
        return FLASH_FAILED_IO;
    }
    /* Read it back, as a flash driver verifies what it programmed. */
    if (pread_full(f->fd, img, FLASH_SLOT_SIZE, slot_offset(slot)) != 0) {
        fprintf(stderr, "flash: reading back slot %u of %s: %s\n", slot, f->path,
                strerror(errno));
        return FLASH_FAILED_IO;
    }
    struct slot_info check = classify(img, name);
    if (check.state != SLOT_VALID || check.seq != seq || check.len != len) {
        fprintf(stderr, "flash: slot %u of %s does not read back as written\n", slot, f->path);
        return FLASH_FAILED_VERIFY;
    }
    if (is_remove) {
        fprintf(stderr, "flash: remove %s: tombstone -> slot %u (seq %u)\n", blob_names[name],
                slot, (unsigned)seq);
    } else {
        fprintf(stderr, "flash: store %s: %zu bytes -> slot %u (seq %u)\n", blob_names[name],
                len, slot, (unsigned)seq);
    }
    return FLEETPROV_STORAGE_OK;
}

/* ---- the storage callbacks (fleetprov_storage) ----------------------------------------- */

/* Called on the thread running the provisioning; `name` and `buf` are valid during the call
 * only. Never logs the content. */
static int32_t flash_load(void *userdata, const char *name, uint8_t *buf, size_t capacity,
                          size_t *len) {
    struct flash *f = userdata;
    int i = name_index(name);
    if (i < 0 || len == NULL || (buf == NULL && capacity > 0)) {
        fprintf(stderr, "flash: load %s: unknown name or bad arguments\n", name ? name : "(null)");
        return FLASH_FAILED_NAME;
    }
    f->loads++;
    struct slot_info info[FLASH_SLOTS_PER_NAME];
    if (scan(f, i, info) != 0) {
        wipe_scratch(f);
        return FLASH_FAILED_IO;
    }
    int cur = newest(info);
    if (cur < 0 || info[cur].flags == FLASH_TOMBSTONE) {
        wipe_scratch(f);
        fprintf(stderr, "flash: load %s: none\n", name);
        return FLEETPROV_STORAGE_NOT_FOUND;
    }
    size_t n = info[cur].len;
    *len = n;
    if (n <= capacity) {
        if (n > 0) {
            memcpy(buf, f->scratch[cur] + FLASH_HEADER_SIZE, n);
        }
        fprintf(stderr, "flash: load %s: %zu bytes (seq %u)\n", name, n, (unsigned)info[cur].seq);
    } else {
        /* The protocol: say the size, copy nothing; the library calls again with room. */
        f->load_retries++;
        fprintf(stderr, "flash: load %s: %zu bytes, more than the %zu offered\n", name, n,
                capacity);
    }
    wipe_scratch(f);
    return FLEETPROV_STORAGE_OK;
}

static int32_t flash_store(void *userdata, const char *name, const uint8_t *data, size_t len) {
    struct flash *f = userdata;
    int i = name_index(name);
    if (i < 0 || (data == NULL && len > 0)) {
        fprintf(stderr, "flash: store %s: unknown name or bad arguments\n", name ? name : "(null)");
        return FLASH_FAILED_NAME;
    }
    if (len > FLASH_MAX_DATA) {
        fprintf(stderr, "flash: %s is %zu bytes, a slot holds %u\n", name, len,
                (unsigned)FLASH_MAX_DATA);
        return FLASH_FAILED_TOO_BIG;
    }
    f->stores++;
    struct slot_info info[FLASH_SLOTS_PER_NAME];
    int r = scan(f, i, info) == 0 ? write_record(f, i, info, 0, data, len, 0) : FLASH_FAILED_IO;
    wipe_scratch(f);
    return r;
}

static int32_t flash_remove(void *userdata, const char *name) {
    struct flash *f = userdata;
    int i = name_index(name);
    if (i < 0) {
        fprintf(stderr, "flash: remove %s: unknown name\n", name ? name : "(null)");
        return FLASH_FAILED_NAME;
    }
    f->removes++;
    struct slot_info info[FLASH_SLOTS_PER_NAME];
    if (scan(f, i, info) != 0) {
        wipe_scratch(f);
        return FLASH_FAILED_IO;
    }
    int cur = newest(info);
    int r = FLEETPROV_STORAGE_OK;
    if (cur < 0 || info[cur].flags == FLASH_TOMBSTONE) {
        fprintf(stderr, "flash: remove %s: none\n", name); /* no such blob is success */
    } else {
        r = write_record(f, i, info, FLASH_TOMBSTONE, NULL, 0, 1);
        cur = 1 - cur; /* the tombstone's slot */
    }
    /* Scrub the rest: the removed data (the journal holds the key and the ownership token), or
     * what a power loss left (a scrub or a write cut short). The tombstone, durable by now, is
     * the newest record, so a crash in here changes nothing a load sees. */
    for (int k = 0; r == FLEETPROV_STORAGE_OK && k < (int)FLASH_SLOTS_PER_NAME; k++) {
        if (k == cur || info[k].state == SLOT_ERASED) {
            continue;
        }
        unsigned slot = (unsigned)i * FLASH_SLOTS_PER_NAME + (unsigned)k;
        memset(f->scratch[k], FLASH_ERASED, FLASH_SLOT_SIZE);
        if (pwrite_full(f->fd, f->scratch[k], FLASH_SLOT_SIZE, slot_offset(slot)) != 0 ||
            fsync(f->fd) != 0) {
            fprintf(stderr, "flash: erasing slot %u of %s: %s\n", slot, f->path,
                    strerror(errno));
            r = FLASH_FAILED_IO;
        } else {
            fprintf(stderr, "flash: remove %s: slot %u erased\n", name, slot);
        }
    }
    wipe_scratch(f);
    return r;
}

/* ---- opening the partition ------------------------------------------------------------- */

static void fsync_parent_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (slash == NULL) {
        memcpy(dir, ".", 2);
    } else if ((size_t)(slash - path) < sizeof dir) {
        size_t n = slash == path ? 1 : (size_t)(slash - path);
        memcpy(dir, path, n);
        dir[n] = '\0';
    } else {
        return;
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
}

/* Creates an erased partition at `path` (0600) if there is none: written whole to PATH.new,
 * fsync()ed and renamed, so that a partition is either absent or complete. 0 or -1 (printed). */
static int flash_format_if_missing(const char *path) {
    struct stat st;
    if (stat(path, &st) == 0) {
        return 0;
    }
    if (errno != ENOENT) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.new", path) >= (int)sizeof tmp) {
        fprintf(stderr, "%s: path too long\n", path);
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "%s: %s\n", tmp, strerror(errno));
        return -1;
    }
    uint8_t erased[FLASH_SLOT_SIZE];
    memset(erased, FLASH_ERASED, sizeof erased);
    int ok = fchmod(fd, 0600) == 0; /* an existing PATH.new could have had another mode */
    for (unsigned s = 0; ok && s < FLASH_SLOTS; s++) {
        ok = pwrite_full(fd, erased, sizeof erased, slot_offset(s)) == 0;
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
    fsync_parent_dir(path);
    fprintf(stderr, "flash: erased partition of %u bytes created at %s\n",
            (unsigned)FLASH_PARTITION_SIZE, path);
    return 0;
}

/* Opens the partition (`writable`: creating it when missing, and setting its mode to 0600).
 * 0 or -1 (printed). */
static int flash_open(struct flash *f, const char *path, int writable) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
    f->path = path;
    f->tear.name = -1;
    if (writable && flash_format_if_missing(path) != 0) {
        return -1;
    }
    int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode) || st.st_size != (off_t)FLASH_PARTITION_SIZE) {
        fprintf(stderr, "%s: not a flash partition of this example (%lld bytes, expected a "
                        "regular file of %u)\n", path, (long long)st.st_size,
                (unsigned)FLASH_PARTITION_SIZE);
        close(fd);
        return -1;
    }
    if (writable && (st.st_mode & 0077) != 0 && fchmod(fd, 0600) != 0) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        close(fd);
        return -1;
    }
    f->fd = fd;
    return 0;
}

static void flash_close(struct flash *f) {
    if (f->fd >= 0) {
        close(f->fd);
        f->fd = -1;
    }
    wipe_scratch(f);
}

/* ---- --show ------------------------------------------------------------------------------ */

/* The string value of the first "key": "..." in `json` (`len` bytes), unescaped into `out`
 * (NUL-terminated). Enough for device.json, whose values the library writes (thingName first,
 * certificateId 64 hex digits); not a JSON parser. 0, or -1 when absent, not a string, or too
 * long. */
static int json_string(const char *json, size_t len, const char *key, char *out, size_t cap) {
    size_t klen = strlen(key);
    for (size_t i = 0; i + klen + 2 <= len; i++) {
        if (json[i] != '"' || memcmp(json + i + 1, key, klen) != 0 || json[i + 1 + klen] != '"') {
            continue;
        }
        size_t p = i + klen + 2;
        while (p < len && (json[p] == ' ' || json[p] == '\n' || json[p] == '\t' ||
                           json[p] == '\r')) {
            p++;
        }
        if (p >= len || json[p] != ':') {
            continue; /* the key text appeared as a value */
        }
        p++;
        while (p < len && (json[p] == ' ' || json[p] == '\n' || json[p] == '\t' ||
                           json[p] == '\r')) {
            p++;
        }
        if (p >= len || json[p] != '"') {
            return -1;
        }
        size_t o = 0;
        for (p++; p < len && json[p] != '"'; p++) {
            char c = json[p];
            if (c == '\\') {
                if (++p >= len || (json[p] != '"' && json[p] != '\\' && json[p] != '/')) {
                    return -1; /* \n, \uXXXX...: not in the names the library writes */
                }
                c = json[p];
            }
            if ((unsigned char)c < 0x20 || o + 1 >= cap) {
                return -1;
            }
            out[o++] = c;
        }
        if (p >= len) {
            return -1;
        }
        out[o] = '\0';
        return 0;
    }
    return -1;
}

static int is_hex64(const char *s) {
    size_t n = 0;
    for (; s[n] != '\0'; n++) {
        if (!((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f'))) {
            return 0;
        }
    }
    return n == 64;
}

/* One blob for --show: whether it is present (with its size, not its content). */
struct shown {
    int present;
    size_t len;
};

static int show(const char *path) {
    struct flash *f = malloc(sizeof *f);
    if (f == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    if (flash_open(f, path, 0) != 0) {
        free(f);
        return 1;
    }
    struct shown blobs[FLASH_NAME_COUNT];
    unsigned invalid = 0;
    char thing[256] = "", cert_id[80] = "";
    int meta_ok = 0;
    int status = 0;
    for (int i = 0; i < (int)FLASH_NAME_COUNT; i++) {
        struct slot_info info[FLASH_SLOTS_PER_NAME];
        if (scan(f, i, info) != 0) {
            status = 1;
            break;
        }
        for (unsigned k = 0; k < FLASH_SLOTS_PER_NAME; k++) {
            invalid += info[k].state == SLOT_INVALID;
        }
        int cur = newest(info);
        blobs[i].present = cur >= 0 && info[cur].flags != FLASH_TOMBSTONE;
        blobs[i].len = blobs[i].present ? info[cur].len : 0;
        if (blobs[i].present && strcmp(blob_names[i], "device.json") == 0) {
            /* device.json holds no secret; only the two fields are printed. */
            const char *json = (const char *)f->scratch[cur] + FLASH_HEADER_SIZE;
            meta_ok = json_string(json, blobs[i].len, "thingName", thing, sizeof thing) == 0 &&
                      json_string(json, blobs[i].len, "certificateId", cert_id,
                                  sizeof cert_id) == 0 &&
                      is_hex64(cert_id);
            if (!meta_ok) {
                thing[0] = cert_id[0] = '\0';
            }
        }
    }
    flash_close(f);
    free(f);
    if (status != 0) {
        return status;
    }
    int complete = meta_ok && blobs[1].present && blobs[2].present;
    printf("flash=%s\n", path);
    printf("thing_name=%s\n", thing);
    printf("certificate_id=%s\n", cert_id);
    printf("device_json=%s\n", !blobs[3].present ? "absent" : meta_ok ? "present" : "invalid");
    printf("certificate_pem=%s\n", blobs[2].present ? "present" : "absent");
    printf("private_key=%s\n", blobs[1].present ? "present" : "absent");
    printf("journal=%s\n", blobs[0].present ? "present" : "absent");
    printf("invalid_slots=%u\n", invalid);
    printf("complete=%d\n", complete);
    return complete ? 0 : 2;
}

/* ---- --self-test --------------------------------------------------------------------------- */

static int expect(int cond, const char *what, int *failures) {
    if (!cond) {
        fprintf(stderr, "self-test: FAILED: %s\n", what);
        (*failures)++;
    }
    return cond;
}

/* Loads `name` through the callback with the protocol the library follows. */
static int32_t load_all(struct flash *f, const char *name, uint8_t *buf, size_t cap,
                        size_t *len) {
    *len = 0;
    int32_t r = flash_load(f, name, NULL, 0, len); /* size first */
    if (r != FLEETPROV_STORAGE_OK || *len > cap) {
        return r;
    }
    return flash_load(f, name, buf, cap, len);
}

static int self_test(const char *path) {
    struct stat st;
    if (stat(path, &st) == 0) {
        fprintf(stderr, "self-test: %s exists; it wants a fresh partition\n", path);
        return 1;
    }
    struct flash *f = malloc(sizeof *f);
    uint8_t *a = malloc(FLASH_MAX_DATA + 1), *b = malloc(FLASH_MAX_DATA + 1);
    if (f == NULL || a == NULL || b == NULL || flash_open(f, path, 1) != 0) {
        free(f);
        free(a);
        free(b);
        return 1;
    }
    int fails = 0;
    size_t len = 0;
    for (size_t i = 0; i <= FLASH_MAX_DATA; i++) {
        a[i] = (uint8_t)(i * 7u + 1u);
    }
    for (unsigned i = 0; i < FLASH_NAME_COUNT; i++) {
        expect(flash_load(f, blob_names[i], b, FLASH_MAX_DATA, &len) ==
                   FLEETPROV_STORAGE_NOT_FOUND, "a fresh partition holds nothing", &fails);
        expect(flash_remove(f, blob_names[i]) == FLEETPROV_STORAGE_OK,
               "removing an absent blob is success", &fails);
    }
    /* The load protocol: the size with no buffer, the size and nothing copied with too small a
     * buffer, the content with room enough. */
    expect(flash_store(f, "journal", a, 5000) == FLEETPROV_STORAGE_OK, "store 5000 bytes", &fails);
    expect(flash_load(f, "journal", NULL, 0, &len) == FLEETPROV_STORAGE_OK && len == 5000,
           "load with no buffer gives the size", &fails);
    memset(b, 0xA5, 4097);
    len = 0;
    expect(flash_load(f, "journal", b, 4096, &len) == FLEETPROV_STORAGE_OK && len == 5000,
           "load with 4096 bytes gives the size", &fails);
    expect(b[0] == 0xA5 && b[4095] == 0xA5 && b[4096] == 0xA5,
           "a buffer too small is left alone", &fails);
    expect(flash_load(f, "journal", b, 5000, &len) == FLEETPROV_STORAGE_OK && len == 5000 &&
               memcmp(a, b, 5000) == 0, "load with room gives the content", &fails);
    /* Replacement, alternating slots, and a blob of zero bytes. */
    for (size_t n = 1; n <= 4; n++) {
        expect(flash_store(f, "journal", a + n, 100 * n) == FLEETPROV_STORAGE_OK, "replace",
               &fails);
        expect(load_all(f, "journal", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
                   len == 100 * n && memcmp(a + n, b, len) == 0, "the newest content", &fails);
    }
    expect(flash_store(f, "device.json", a, 0) == FLEETPROV_STORAGE_OK &&
               load_all(f, "device.json", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
               len == 0, "a blob of zero bytes", &fails);
    /* The largest blob fits; one byte more is refused and changes nothing. */
    expect(flash_store(f, "certificate.pem", a, FLASH_MAX_DATA) == FLEETPROV_STORAGE_OK,
           "the largest blob", &fails);
    expect(flash_store(f, "certificate.pem", b, FLASH_MAX_DATA + 1) == FLASH_FAILED_TOO_BIG,
           "a blob too big is refused", &fails);
    expect(load_all(f, "certificate.pem", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
               len == FLASH_MAX_DATA && memcmp(a, b, len) == 0,
           "a refused store changes nothing", &fails);
    expect(flash_store(f, "other", a, 1) == FLASH_FAILED_NAME &&
               flash_load(f, "other", b, 1, &len) == FLASH_FAILED_NAME &&
               flash_remove(f, "other") == FLASH_FAILED_NAME, "an unknown name fails", &fails);
    /* A tombstone hides the blob and scrubs its data from both slots. */
    expect(flash_store(f, "private.key", a, 300) == FLEETPROV_STORAGE_OK &&
               flash_store(f, "private.key", a + 1, 300) == FLEETPROV_STORAGE_OK &&
               flash_remove(f, "private.key") == FLEETPROV_STORAGE_OK, "remove", &fails);
    expect(flash_load(f, "private.key", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_NOT_FOUND,
           "a removed blob is not found", &fails);
    struct slot_info info[FLASH_SLOTS_PER_NAME];
    int key = name_index("private.key");
    expect(scan(f, key, info) == 0 && ((info[0].state == SLOT_ERASED &&
                                        info[1].flags == FLASH_TOMBSTONE) ||
                                       (info[1].state == SLOT_ERASED &&
                                        info[0].flags == FLASH_TOMBSTONE)),
           "a remove leaves a tombstone and an erased slot", &fails);
    uint8_t *before = malloc(FLASH_PARTITION_SIZE), *after = malloc(FLASH_PARTITION_SIZE);
    expect(before != NULL && after != NULL &&
               pread_full(f->fd, before, FLASH_PARTITION_SIZE, 0) == 0 &&
               flash_remove(f, "private.key") == FLEETPROV_STORAGE_OK &&
               pread_full(f->fd, after, FLASH_PARTITION_SIZE, 0) == 0 &&
               memcmp(before, after, FLASH_PARTITION_SIZE) == 0,
           "removing again writes nothing", &fails);
    free(before);
    free(after);
    expect(flash_store(f, "private.key", a + 2, 10) == FLEETPROV_STORAGE_OK &&
               load_all(f, "private.key", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
               len == 10 && memcmp(a + 2, b, 10) == 0, "stored again after a remove", &fails);
    /* A write cut short (the test aid's power loss, without the freeze) leaves the old
     * content; so does a record whose CRC no longer matches (a bit flipped in flash). */
    int j = name_index("journal");
    expect(scan(f, j, info) == 0, "scan", &fails);
    int cur = newest(info);
    unsigned other = (unsigned)j * FLASH_SLOTS_PER_NAME + (unsigned)(1 - cur);
    size_t record = build_record(f->scratch[0], j, info[cur].seq + 1, 0, a, 3000);
    expect(pwrite_full(f->fd, f->scratch[0], record / 2, slot_offset(other)) == 0,
           "half a record", &fails);
    expect(load_all(f, "journal", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
               len == 400 && memcmp(a + 4, b, len) == 0, "a torn record is ignored", &fails);
    expect(flash_store(f, "journal", a + 5, 50) == FLEETPROV_STORAGE_OK &&
               load_all(f, "journal", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
               len == 50, "a store over a torn record", &fails);
    expect(scan(f, j, info) == 0, "scan", &fails);
    cur = newest(info);
    unsigned slot = (unsigned)j * FLASH_SLOTS_PER_NAME + (unsigned)cur;
    uint8_t byte = 0;
    off_t at = slot_offset(slot) + FLASH_HEADER_SIZE + 10;
    expect(pread_full(f->fd, &byte, 1, at) == 0, "read a byte", &fails);
    byte ^= 0x10;
    expect(pwrite_full(f->fd, &byte, 1, at) == 0, "flip a bit", &fails);
    expect(load_all(f, "journal", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
               len == 400 && memcmp(a + 4, b, len) == 0,
           "a record with a bad CRC is ignored: the older one is read", &fails);
    /* Everything is in the file: a second open reads the same. */
    flash_close(f);
    if (expect(flash_open(f, path, 1) == 0, "open again", &fails)) {
        expect(load_all(f, "device.json", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
                   len == 0, "reopened: device.json", &fails);
        expect(load_all(f, "private.key", b, FLASH_MAX_DATA, &len) == FLEETPROV_STORAGE_OK &&
                   len == 10 && memcmp(a + 2, b, 10) == 0, "reopened: private.key", &fails);
        flash_close(f);
    }
    free(f);
    free(a);
    free(b);
    if (fails != 0) {
        fprintf(stderr, "self-test: %d failures\n", fails);
        return 1;
    }
    printf("self_test=ok\n");
    return 0;
}

/* ---- provisioning ---------------------------------------------------------------------- */

struct reporter {
    const char *stop_at; /* a step name from FLEETPROV_EXAMPLE_STOP_AT, or NULL */
    unsigned steps;
    unsigned lines;
};

/* Runs on the calling thread (blocking fleetprov_provision); `progress` is valid only during
 * the call. */
static void on_progress(void *userdata, const fleetprov_progress *progress) {
    struct reporter *rep = userdata;
    rep->steps++;
    example_print_progress("provision_flash:", progress);
    const char *name = example_step_name(progress->step);
    if (rep->stop_at != NULL && strcmp(rep->stop_at, name) == 0) {
        example_stop_here("provision_flash", name);
    }
}

static void on_log(void *userdata, fleetprov_log_level level, const char *message, size_t len) {
    struct reporter *rep = userdata;
    static const char *const levels[] = {"?", "ERROR", "WARN", "INFO", "DEBUG"};
    rep->lines++;
    fprintf(stderr, "provision_flash: log %s: %.*s\n",
            (level >= 1 && level <= 4) ? levels[level] : "?", (int)len, message);
}

/* Set before the handlers are installed, freed after they are restored. */
static fleetprov_cancel *cancel_switch;

static void on_signal(int sig) {
    (void)sig;
    fleetprov_cancel_trigger(cancel_switch); /* async-signal-safe */
}

/* --show and --self-test take --flash PATH and nothing else. Returns the exit status, or -1
 * when argv asks for neither. */
static int other_modes(int argc, char **argv) {
    int show_mode = 0, test_mode = 0;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--show") == 0) {
            show_mode = 1;
        } else if (strcmp(argv[i], "--self-test") == 0) {
            test_mode = 1;
        }
    }
    if (!show_mode && !test_mode) {
        return -1;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--show") == 0 || strcmp(argv[i], "--self-test") == 0) {
            continue;
        }
        if (strcmp(argv[i], "--flash") == 0 && i + 1 < argc && path == NULL) {
            path = argv[++i];
            continue;
        }
        fprintf(stderr, "%s: --show and --self-test take --flash PATH only (got %s)\n", argv[0],
                argv[i]);
        path = NULL;
        break;
    }
    if (path == NULL || (show_mode && test_mode)) {
        fprintf(stderr, "usage: %s --show --flash PATH\n       %s --self-test --flash PATH\n",
                argv[0], argv[0]);
        return 1;
    }
    return show_mode ? show(path) : self_test(path);
}

int main(int argc, char **argv) {
    int other = other_modes(argc, argv);
    if (other >= 0) {
        return other;
    }
    struct example_args args;
    const char *flash_path = NULL;
    int reprovision = 0;
    const struct example_option options[] = {
        {"--flash", "PATH", &flash_path, NULL},
        {"--reprovision", NULL, NULL, &reprovision},
        {"--show", NULL, NULL, NULL},
        {"--self-test", NULL, NULL, NULL},
    };
    size_t n_options = sizeof options / sizeof options[0];
    const char *stop_step = NULL;
    struct tear tear;
    if (example_parse_args_with(argc, argv, &args, 0, options, n_options) != 0 ||
        stop_at_from_env(&stop_step, &tear) != 0) {
        return 1;
    }
    if (flash_path == NULL || args.out_dir != NULL || args.state_dir != NULL) {
        fprintf(stderr, "%s: %s\n", argv[0],
                flash_path == NULL ? "--flash is required"
                                   : "--flash keeps the journal and the credentials: it takes "
                                     "no --out or --state-dir");
        example_usage(argv[0], options, n_options);
        return 1;
    }
    fleetprov_config *cfg = example_config(&args);
    if (cfg == NULL) {
        return 1;
    }
    /* The store: heap memory owned here, handed to the library as userdata without a
     * userdata_free (it outlives the config, which is freed first). */
    struct flash *flash = malloc(sizeof *flash);
    if (flash == NULL || flash_open(flash, flash_path, 1) != 0) {
        if (flash == NULL) {
            fprintf(stderr, "out of memory\n");
        }
        free(flash);
        fleetprov_config_free(cfg);
        return 1;
    }
    flash->tear = tear;
    int status = 1;
    fleetprov_provisioned *p = NULL;
    struct reporter rep = {stop_step, 0, 0}; /* outlives cfg: no userdata_free needed */
    const fleetprov_storage storage = {sizeof(fleetprov_storage), flash_load, flash_store,
                                       flash_remove};
    const char *what = "fleetprov_config_set_storage";
    fleetprov_result r = fleetprov_config_set_storage(cfg, &storage, flash, NULL);
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_method";
        r = fleetprov_config_set_method(cfg, args.method);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_verify";
        r = fleetprov_config_set_verify(cfg, args.verify != 0);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_reprovision";
        r = fleetprov_config_set_reprovision(cfg, reprovision != 0);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_progress_callback";
        r = fleetprov_config_set_progress_callback(cfg, on_progress, &rep, NULL);
    }
    if (r == FLEETPROV_OK) {
        what = "fleetprov_config_set_log_callback";
        r = fleetprov_config_set_log_callback(cfg, on_log, &rep, NULL, FLEETPROV_LOG_DEBUG);
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
    if (r == FLEETPROV_OK) {
        what = "fleetprov_provision";
        r = fleetprov_provision(cfg, &p);
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (r == FLEETPROV_CANCELLED) {
        fprintf(stderr, "provision_flash: interrupted; the journal stays in %s: run the same "
                        "command again to resume\n", flash_path);
    }
    if (r != FLEETPROV_OK) {
        example_report_failure(what, r);
        goto out;
    }
    fprintf(stderr, "provision_flash: %u steps, %u log lines\n", rep.steps, rep.lines);
    if (fleetprov_provisioned_already_provisioned(p)) {
        fprintf(stderr, "provision_flash: %s holds the credentials of an earlier run; nothing "
                        "to do\n", flash_path);
        printf("already_provisioned=1\n");
    }
    printf("thing_name=%s\n", fleetprov_provisioned_thing_name(p));
    printf("certificate_id=%s\n", fleetprov_provisioned_certificate_id(p));
    printf("flash=%s\n", flash_path);
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
    fleetprov_config_free(cfg); /* the last user of `flash` and `rep` */
    fleetprov_cancel_free(cancel_switch);
    printf("flash_loads=%u\nflash_stores=%u\nflash_removes=%u\nflash_load_retries=%u\n",
           flash->loads, flash->stores, flash->removes, flash->load_retries);
    flash_close(flash);
    free(flash);
    return status;
}
