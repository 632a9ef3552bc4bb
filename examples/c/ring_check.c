/* ring_check.c: read a kvref golden file using only the C standard library, replay its ring
 * (sliding-window) KV-cache appends in a cache of its own, and compare that cache with the state the
 * file stores after every step. It shows that a reader needs nothing but ../../docs/golden-format.md.
 *
 * File layout (safetensors): 8 bytes little-endian uint64 N | N bytes of JSON header | data buffer.
 * Header: {"__metadata__":{"format":"kvref-golden 1"},
 *          "<name>":{"dtype":"F32","shape":[...],"data_offsets":[begin,end]}, ...}
 * Offsets are relative to the start of the data buffer; data is little-endian and row-major.
 *
 * Build: cc -std=c99 -O2 -Wall -Wextra -o ring_check ring_check.c
 * Run:   ./ring_check ../../golden/v1/ring_wrap.safetensors
 * Exit:  0 every step matches, 1 a mismatch, 2 unreadable or malformed file.
 * (The file's sha256 in manifest.json is not checked here; `python -m kvref.golden check` checks it.) */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXDIM 8

typedef struct {
    char dtype[8];
    int ndim;
    long long shape[MAXDIM], numel;
    const unsigned char *data; /* points into the data buffer */
} Tensor;

static char *header, *header_end;    /* NUL-terminated copy of the JSON header */
static const unsigned char *buffer;  /* the data buffer */
static long long buffer_len;

static void die(const char *fmt, ...) /* unreadable or malformed file: exit status 2 */
{
    va_list ap;
    va_start(ap, fmt);
    fputs("ring_check: ", stderr), vfprintf(stderr, fmt, ap), fputs("\n", stderr);
    va_end(ap);
    exit(2);
}

/* ---- little-endian decoding, whatever the host's byte order ---- */
static uint64_t le_u64(const unsigned char *p)
{
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static long long le_i64(const unsigned char *p) /* int64_t is two's complement: reinterpret the bits */
{
    uint64_t u = le_u64(p);
    int64_t v;
    memcpy(&v, &u, 8);
    return v;
}
static float le_f32(const unsigned char *p)
{
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    float f;
    memcpy(&f, &u, 4); /* assumes IEEE-754 binary32, as on every current platform */
    return f;
}

/* ---- a tiny JSON scanner, just enough for this header ---- */
static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* Find "key": in [from, to) and return a pointer to its value, or NULL. */
static const char *find_key(const char *from, const char *to, const char *key)
{
    char quoted[256];
    const char *p = from, *q;
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    while ((p = strstr(p, quoted)) != NULL && p < to) {
        q = skip_ws(p + strlen(quoted));
        if (*q == ':') return skip_ws(q + 1);
        p++; /* a string value equal to the key, not the key itself: keep looking */
    }
    return NULL;
}

static int read_int_list(const char *p, long long *out, int max, const char *what) /* [a, b, ...] */
{
    int n = 0;
    char *end;
    if (*p != '[') die("header: %s: expected a list", what);
    for (p = skip_ws(p + 1); *p != ']';) {
        if (n == max) die("header: %s: list too long", what);
        out[n++] = strtoll(p, &end, 10);
        if (end == p) die("header: %s: expected an integer", what);
        p = skip_ws(end);
        if (*p == ',') p = skip_ws(p + 1);
        else if (*p != ']') die("header: %s: expected ',' or ']'", what);
    }
    return n;
}

static void read_string(const char *p, char *out, size_t size, const char *what) /* "..." (no escapes) */
{
    size_t n = 0;
    if (*p++ != '"') die("header: %s: expected a string", what);
    while (*p && *p != '"' && n + 1 < size) out[n++] = *p++;
    if (*p != '"') die("header: %s: unterminated or too long string", what);
    out[n] = '\0';
}

static int dtype_size(const char *dt) /* bytes per element; 0 for an unknown dtype */
{
    return !strcmp(dt, "F32") || !strcmp(dt, "I32") ? 4 : !strcmp(dt, "I64") ? 8 : !strcmp(dt, "F16") ? 2
         : !strcmp(dt, "U8") ? 1 : 0;
}

/* Look up tensor `name`: 0 if the header has no such entry, else fill *t after checking its bytes. */
static int get_tensor(const char *name, Tensor *t)
{
    const char *v = find_key(header, header_end, name), *end, *p;
    long long off[2];
    int i;
    if (!v) return 0;
    if (*v != '{' || !(end = strchr(v, '}'))) die("header: %s: expected an object", name);
    if (!(p = find_key(v, end, "dtype"))) die("header: %s: no dtype", name);
    read_string(p, t->dtype, sizeof t->dtype, name);
    if (!dtype_size(t->dtype)) die("header: %s: unknown dtype %s", name, t->dtype);
    if (!(p = find_key(v, end, "shape"))) die("header: %s: no shape", name);
    t->ndim = read_int_list(p, t->shape, MAXDIM, name);
    for (t->numel = 1, i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0 || (t->shape[i] > 0 && t->numel > buffer_len / t->shape[i]))
            die("%s: shape too large for the file", name);
        t->numel *= t->shape[i];
    }
    if (!(p = find_key(v, end, "data_offsets")) || read_int_list(p, off, 2, name) != 2)
        die("header: %s: no data_offsets [begin, end]", name);
    if (off[0] < 0 || off[1] > buffer_len || off[1] - off[0] != t->numel * dtype_size(t->dtype))
        die("%s: data_offsets [%lld, %lld] do not fit its dtype and shape or the file", name, off[0], off[1]);
    t->data = buffer + off[0];
    return 1;
}

/* The tensor "<step>/<what>", which must exist with this dtype and number of dimensions. */
static Tensor need(const char *step, const char *what, const char *dtype, int ndim)
{
    char name[128];
    Tensor t;
    snprintf(name, sizeof name, "%s/%s", step, what);
    if (!get_tensor(name, &t)) die("missing tensor %s", name);
    if (strcmp(t.dtype, dtype) || t.ndim != ndim)
        die("%s: expected %s with %d dims, found %s with %d (this example reads float32 ring cases)",
            name, dtype, ndim, t.dtype, t.ndim);
    return t;
}

/* Print a mismatch: the flat index as [i,j,...] in the file tensor's shape, then both values. */
static void report(const char *step, const char *what, const Tensor *t, long long flat, double file, double mine)
{
    long long idx[MAXDIM];
    int d;
    for (d = t->ndim - 1; d >= 0; d--) { idx[d] = flat % t->shape[d]; flat /= t->shape[d]; }
    printf("  %s %s: first mismatch at [", step, what);
    for (d = 0; d < t->ndim; d++) printf(d ? ",%lld" : "%lld", idx[d]);
    printf("]: file has %.9g, C cache has %.9g\n", file, mine);
}

/* Compare K or V slots on the non-empty slots (file's slot_positions >= 0); return first bad index or -1. */
static long long cmp_slots(const Tensor *f, const float *mine, const Tensor *fpos, long long row, double *maxerr)
{
    long long j, bad = -1;
    *maxerr = 0;
    for (j = 0; j < f->numel; j++) {
        float a = le_f32(f->data + 4 * j);
        double d = a > mine[j] ? (double)a - mine[j] : (double)mine[j] - a;
        if (le_i64(fpos->data + 8 * (j / row)) < 0) continue; /* empty slot: masked */
        if (d > *maxerr) *maxerr = d;
        if (a != mine[j] && bad < 0) bad = j;
    }
    return bad;
}

static const char *verdict(long long bad) { return bad < 0 ? "ok" : "MISMATCH"; }

int main(int argc, char **argv)
{
    FILE *fp;
    long size;
    unsigned char *file;
    uint64_t n;
    char fmt[64];
    const char *meta;
    int s, failed = 0;
    if (argc != 2) { fprintf(stderr, "usage: %s PATH/ring_wrap.safetensors\n", argv[0]); return 2; }

    /* 1. Read the whole file and split it into header and data buffer. */
    if (!(fp = fopen(argv[1], "rb"))) die("cannot open %s", argv[1]);
    if (fseek(fp, 0, SEEK_END) || (size = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET) ||
        !(file = malloc(size ? (size_t)size : 1)) || fread(file, 1, (size_t)size, fp) != (size_t)size)
        die("cannot read %s", argv[1]);
    fclose(fp);
    if (size < 8 || (n = le_u64(file)) > (uint64_t)size - 8)
        die("%s: not a safetensors file (too short for its header length)", argv[1]);
    if (!(header = malloc((size_t)n + 1))) die("out of memory");
    memcpy(header, file + 8, (size_t)n);
    header[n] = '\0';
    header_end = header + strlen(header);
    buffer = file + 8 + n;
    buffer_len = (long long)((uint64_t)size - 8 - n);
    if (*skip_ws(header) != '{') die("%s: header is not a JSON object", argv[1]);

    /* 2. The metadata must say this is a kvref golden file, format version 1. */
    if (!(meta = find_key(header, header_end, "__metadata__")) || *meta != '{' ||
        !(meta = find_key(meta, strchr(meta, '}'), "format")))
        die("%s: no __metadata__.format: not a kvref golden file", argv[1]);
    read_string(meta, fmt, sizeof fmt, "__metadata__.format");
    if (strcmp(fmt, "kvref-golden 1")) die("%s: format is \"%s\", expected \"kvref-golden 1\"", argv[1], fmt);

    /* 3. Dimensions from step00's state: slot_positions (layers, batch, W), k_slots (.., kv_heads, head_dim). */
    Tensor sp0 = need("step00", "state/slot_positions", "I64", 3), ks0 = need("step00", "state/k_slots", "F32", 5);
    long long L = sp0.shape[0], B = sp0.shape[1], W = sp0.shape[2], H = ks0.shape[3], D = ks0.shape[4];
    long long row = H * D, nslots = L * B * W, i, t, l, e;
    if (ks0.shape[0] != L || ks0.shape[1] != B || ks0.shape[2] != W || W < 1)
        die("step00: k_slots and slot_positions shapes disagree");

    /* 4. Our own ring cache: per layer, per sequence, W slots of kv_heads*head_dim floats. */
    float *kc = calloc((size_t)(nslots * row + 1), sizeof *kc), *vc = calloc((size_t)(nslots * row + 1), sizeof *vc);
    long long *pos = malloc((size_t)(nslots + 1) * sizeof *pos), *lengths = calloc((size_t)B + 1, sizeof *lengths);
    if (!kc || !vc || !pos || !lengths) die("out of memory");
    for (i = 0; i < nslots; i++) pos[i] = -1; /* -1: empty slot */

    /* 5. Replay the steps step00, step01, ... and compare after each. */
    for (s = 0;; s++) {
        char step[16], prefix[24];
        snprintf(step, sizeof step, "step%02d", s);
        snprintf(prefix, sizeof prefix, "\"%s/", step);
        if (!strstr(header, prefix)) break;
        Tensor ids = need(step, "input/seq_ids", "I64", 1), k = need(step, "input/k", "F32", 5),
               v = need(step, "input/v", "F32", 5);
        long long nseq = ids.numel, T = k.shape[2];
        if (k.shape[0] != L || k.shape[1] != nseq || k.shape[3] != H || k.shape[4] != D ||
            memcmp(k.shape, v.shape, sizeof k.shape))
            die("%s: input k/v shapes do not match the cache", step);
        printf("%s  append seqs [", step);
        for (i = 0; i < nseq; i++) {
            long long sq = le_i64(ids.data + 8 * i);
            if (sq < 0 || sq >= B) die("%s: seq id %lld out of range", step, sq);
            printf(i ? " %lld" : "%lld", sq);
            for (t = 0; t < T; t++) { /* the ring rule: position p lives in slot p % W */
                long long p = lengths[sq] + t, slot = p % W;
                for (l = 0; l < L; l++) {
                    long long src = ((l * nseq + i) * T + t) * row, dst = ((l * B + sq) * W + slot) * row;
                    for (e = 0; e < row; e++) {
                        kc[dst + e] = le_f32(k.data + 4 * (src + e));
                        vc[dst + e] = le_f32(v.data + 4 * (src + e));
                    }
                    pos[(l * B + sq) * W + slot] = p; /* overwrites position p - W, if any */
                }
            }
            lengths[sq] += T;
        }

        Tensor fsp = need(step, "state/slot_positions", "I64", 3), fk = need(step, "state/k_slots", "F32", 5),
               fv = need(step, "state/v_slots", "F32", 5), flen = need(step, "state/lengths", "I64", 1);
        if (fsp.numel != nslots || fk.numel != nslots * row || fv.numel != nslots * row || flen.numel != B)
            die("%s: state shapes differ from step00's", step);
        long long bad_sp = -1, bad_len = -1, bad_k, bad_v;
        double err_k, err_v;
        for (i = nslots - 1; i >= 0; i--) if (le_i64(fsp.data + 8 * i) != pos[i]) bad_sp = i;
        for (i = B - 1; i >= 0; i--) if (le_i64(flen.data + 8 * i) != lengths[i]) bad_len = i;
        bad_k = cmp_slots(&fk, kc, &fsp, row, &err_k);
        bad_v = cmp_slots(&fv, vc, &fsp, row, &err_v);
        printf("] T=%lld  slot_positions %s  k_slots %s (max err %g)  v_slots %s (max err %g)  lengths %s\n", T,
               verdict(bad_sp), verdict(bad_k), err_k, verdict(bad_v), err_v, verdict(bad_len));
        if (bad_sp >= 0) report(step, "slot_positions", &fsp, bad_sp, le_i64(fsp.data + 8 * bad_sp), pos[bad_sp]);
        if (bad_k >= 0) report(step, "k_slots", &fk, bad_k, le_f32(fk.data + 4 * bad_k), kc[bad_k]);
        if (bad_v >= 0) report(step, "v_slots", &fv, bad_v, le_f32(fv.data + 4 * bad_v), vc[bad_v]);
        if (bad_len >= 0) report(step, "lengths", &flen, bad_len, le_i64(flen.data + 8 * bad_len), lengths[bad_len]);
        failed += bad_sp >= 0 || bad_k >= 0 || bad_v >= 0 || bad_len >= 0;
    }
    printf("%s: %d steps (layers %lld, batch %lld, window %lld, kv_heads %lld, head_dim %lld): ", argv[1], s,
           L, B, W, H, D);
    if (failed) printf("MISMATCH in %d of %d steps\n", failed, s);
    else printf("all match\n");
    free(kc), free(vc), free(pos), free(lengths), free(header), free(file);
    return failed ? 1 : 0;
}
