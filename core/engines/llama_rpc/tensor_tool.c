/* FNV-1a 64 over byte ranges of a file, as llama.cpp's RPC client hashes a tensor (ggml-rpc.cpp
 * fnv_hash), and cutting a range out of a file into a cache file under its hash name.
 *
 * Built two ways: here as a shared library (ctypes: fnv1a_file), on a node as a program
 * (-DTOOL_MAIN):
 *   tensor_tool hash FILE OFFSET SIZE             -> "hash HEX16"
 *   tensor_tool cut FILE OFFSET SIZE HEX16 DIR    -> "ok HEX16" | "error WHAT ..."
 * `cut` writes DIR/.part-HEX16 (a name rpc-server never asks for), checks size and hash, then
 * renames it to DIR/HEX16; on any failure the partial file is removed. */
#define _FILE_OFFSET_BITS 64
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (1 << 20)
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t fnv1a(const unsigned char *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}

/* 0 and *out set, or an errno value (EIO when the file ends early). */
int fnv1a_file(const char *path, uint64_t offset, uint64_t size, uint64_t *out) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return errno;
    unsigned char *buf = malloc(CHUNK);
    if (!buf) { close(fd); return ENOMEM; }
    uint64_t h = FNV_OFFSET, done = 0;
    int err = 0;
    while (done < size) {
        size_t want = size - done < CHUNK ? (size_t)(size - done) : CHUNK;
        ssize_t got = pread(fd, buf, want, (off_t)(offset + done));
        if (got < 0) { if (errno == EINTR) continue; err = errno; break; }
        if (got == 0) { err = EIO; break; }
        h = fnv1a(buf, (size_t)got, h);
        done += (uint64_t)got;
    }
    free(buf);
    close(fd);
    if (!err) *out = h;
    return err;
}

#ifdef TOOL_MAIN
static int cut(const char *src, uint64_t offset, uint64_t size, const char *want, const char *dir) {
    char part[4096], final[4096];
    if (strlen(want) != 16 || strspn(want, "0123456789abcdef") != 16) {
        printf("error badhash\n"); return 2;
    }
    snprintf(part, sizeof part, "%s/.part-%s", dir, want);
    snprintf(final, sizeof final, "%s/%s", dir, want);
    int in = open(src, O_RDONLY);
    if (in < 0) { printf("error read %s\n", strerror(errno)); return 1; }
    int out = open(part, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (out < 0) { printf("error write %s\n", strerror(errno)); close(in); return 1; }
    unsigned char *buf = malloc(CHUNK);
    uint64_t h = FNV_OFFSET, done = 0;
    int err = 0; const char *what = "read";
    while (buf && done < size) {
        size_t n = size - done < CHUNK ? (size_t)(size - done) : CHUNK;
        ssize_t got = pread(in, buf, n, (off_t)(offset + done));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) { err = got < 0 ? errno : EIO; break; }
        h = fnv1a(buf, (size_t)got, h);
        for (ssize_t w = 0; w < got;) {
            ssize_t put = write(out, buf + w, (size_t)(got - w));
            if (put < 0 && errno == EINTR) continue;
            if (put < 0) { err = errno; what = "write"; break; }
            w += put;
        }
        if (err) break;
        done += (uint64_t)got;
    }
    free(buf);
    close(in);
    if (!err && fsync(out) != 0) { err = errno; what = "write"; }
    if (close(out) != 0 && !err) { err = errno; what = "write"; }
    char got_hex[17];
    snprintf(got_hex, sizeof got_hex, "%016" PRIx64, h);
    if (!err && strcmp(got_hex, want) != 0) {
        unlink(part); printf("error mismatch %s\n", got_hex); return 1;
    }
    if (err) {
        unlink(part);
        printf("error %s %s\n", err == ENOSPC ? "nospace" : what, strerror(err));
        return 1;
    }
    if (rename(part, final) != 0) {
        err = errno; unlink(part); printf("error write %s\n", strerror(err)); return 1;
    }
    printf("ok %s\n", want);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "hash") == 0) {
        uint64_t h;
        int err = fnv1a_file(argv[2], strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10), &h);
        if (err) { printf("error read %s\n", strerror(err)); return 1; }
        printf("hash %016" PRIx64 "\n", h);
        return 0;
    }
    if (argc == 7 && strcmp(argv[1], "cut") == 0)
        return cut(argv[2], strtoull(argv[3], 0, 10), strtoull(argv[4], 0, 10), argv[5], argv[6]);
    fprintf(stderr, "usage: tensor_tool hash FILE OFFSET SIZE | cut FILE OFFSET SIZE HEX16 DIR\n");
    return 2;
}
#endif
