/* A simxen guest in C, written from docs/simxen.md: grant one page to dom0, offer an event
 * channel, print "ref port", wait for dom0's notification, check what dom0 wrote into the
 * page, then revoke the grant once dom0 has unmapped it. Usage: guest DIR DOMID */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void die(const char *m) { perror(m); exit(1); }

static int unix_connect(const char *path, int type) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    int s = socket(AF_UNIX, type, 0);
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) die(path);
    return s;
}

/* one JSON request line, one reply line (replies are short) */
static void call(int s, const char *req, char *rep, size_t n) {
    size_t got = 0;
    if (write(s, req, strlen(req)) < 0 || write(s, "\n", 1) < 0) die("write");
    while (got < n - 1) {
        ssize_t r = read(s, rep + got, 1);
        if (r <= 0) die("read");
        if (rep[got] == '\n') break;
        got++;
    }
    rep[got] = 0;
    if (!strstr(rep, "\"ok\": true")) { fprintf(stderr, "refused: %s\n", rep); exit(1); }
}

static long field(const char *json, const char *key) {      /* first number after "key": */
    const char *p = strstr(json, key);
    if (!p) { fprintf(stderr, "no %s in %s\n", key, json); exit(1); }
    p += strlen(key);
    while (*p && (*p < '0' || *p > '9')) p++;
    return strtol(p, NULL, 10);
}

static int ofd_lock(int fd, short type, long start) {
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = 8};
    return fcntl(fd, F_OFD_SETLK, &fl);
}

int main(int argc, char **argv) {
    char path[512], req[256], rep[1024];
    if (argc != 3) { fprintf(stderr, "usage: guest DIR DOMID\n"); return 2; }
    const char *dir = argv[1];
    int domid = atoi(argv[2]);

    /* 4: reserve one frame and one grant ref */
    snprintf(path, sizeof path, "%s/control.sock", dir);
    int ctl = unix_connect(path, SOCK_STREAM);
    snprintf(req, sizeof req, "{\"op\": \"reserve\", \"domid\": %d, \"frames\": 1, \"refs\": 1}", domid);
    call(ctl, req, rep, sizeof rep);
    long frame = field(rep, "\"frames\""), ref = field(rep, "\"refs\"");

    /* 5.2: fill the page, then grant it: domid and frame first, flags last */
    snprintf(path, sizeof path, "%s/mem/d%d", dir, domid);
    int memfd = open(path, O_RDWR);
    char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, frame * 4096);
    if (memfd < 0 || page == MAP_FAILED) die("mem");
    memset(page, 0, 4096);
    strcpy(page, "hello from C");
    snprintf(path, sizeof path, "%s/gnttab/d%d", dir, domid);
    int gtfd = open(path, O_RDWR);
    uint8_t *gt = mmap(NULL, (ref + 1) * 8, PROT_READ | PROT_WRITE, MAP_SHARED, gtfd, 0);
    if (gtfd < 0 || gt == MAP_FAILED) die("gnttab");
    uint16_t backend = 0, flags = 1;                        /* GTF_permit_access */
    uint32_t fr = (uint32_t)frame;
    memcpy(gt + ref * 8 + 2, &backend, 2);
    memcpy(gt + ref * 8 + 4, &fr, 4);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memcpy(gt + ref * 8, &flags, 2);

    /* 6.1: an event-channel handle and an unbound port for dom0 */
    snprintf(path, sizeof path, "%s/evtchn.sock", dir);
    int ev = unix_connect(path, SOCK_STREAM);
    snprintf(req, sizeof req, "{\"op\": \"hello\", \"domid\": %d}", domid);
    call(ev, req, rep, sizeof rep);
    long handle = field(rep, "\"handle\"");
    struct sockaddr_un wa = {.sun_family = AF_UNIX};
    snprintf(wa.sun_path, sizeof wa.sun_path, "%s/evtchn/h%ld.sock", dir, handle);
    int wake = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (bind(wake, (struct sockaddr *)&wa, sizeof wa)) die("bind");
    snprintf(path, sizeof path, "%s/evtchn/h%ld.pending", dir, handle);
    int pfd = open(path, O_RDWR);
    volatile uint32_t *counters = mmap(NULL, 4096 * 4, PROT_READ, MAP_SHARED, pfd, 0);
    if (pfd < 0 || counters == MAP_FAILED) die("pending");
    call(ev, "{\"op\": \"alloc_unbound\", \"remote_domid\": 0}", rep, sizeof rep);
    long port = field(rep, "\"port\"");

    printf("%ld %ld\n", ref, port);
    fflush(stdout);

    /* 6.3: poll, drain the socket, then compare our counter with the last value seen (0) */
    uint32_t seen = 0;
    for (int tries = 0; counters[port] == seen; tries++) {
        struct pollfd p = {.fd = wake, .events = POLLIN};
        char b[64];
        if (tries > 50 || poll(&p, 1, 200) < 0) { fprintf(stderr, "no event\n"); return 1; }
        while (recv(wake, b, sizeof b, 0) > 0) ;
    }
    seen = counters[port];
    if (strcmp(page + 100, "hello from dom0")) { fprintf(stderr, "page: %s\n", page + 100); return 1; }
    printf("event ok\n");
    fflush(stdout);

    /* 5.2 revoke: wait until dom0 no longer maps the page (the write lock is granted) */
    for (int tries = 0; ofd_lock(gtfd, F_WRLCK, ref * 8); tries++) {
        if (tries > 500) { fprintf(stderr, "still mapped\n"); return 1; }
        usleep(10000);
    }
    memset(gt + ref * 8, 0, 8);
    ofd_lock(gtfd, F_UNLCK, ref * 8);
    printf("revoked\n");
    return 0;
}
