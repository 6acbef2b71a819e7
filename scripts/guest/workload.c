/* qmigrate guest workload: one static binary, chosen by its arguments.
 *   workload cpu                    busy loop on one vCPU
 *   workload dirty MiB [MiB/s]      random writes over MiB of memory, as fast as possible or rate-limited
 *   workload netrecv PORT           TCP listener that discards everything it receives
 *   workload send IP PORT KiB/s     TCP sender to IP:PORT at KiB/s (connects every 200 ms until it can, reconnects
 *                                   after a drop)
 *   workload hog MiB                holds MiB of memory and writes one byte per page of it, pass after pass, 50 ms
 *                                   apart (init runs it for workload=swap:MiB, with /dev/vda as swap)
 *   workload disk DEVICE            continuous writes over a block device
 *   workload ticks MS               prints "tick N" (N = 1, 2, 3, ...) every MS ms, forever
 * Each but ticks prints one "ready" line to stdout once its steady state begins. ticks prints none: it runs beside
 * another workload (init starts it for the kernel parameter ticks=MS), and a "ready" line from it would let a
 * harness think the main workload is ready. Its counter lives in guest memory, so it survives a migration, and a
 * guest that ran twice from one state, or was rolled back, shows on the consoles as a repeated or lower N. */
#define _GNU_SOURCE
#include <errno.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cpu(void) {
    volatile uint64_t x = 0;
    printf("workload cpu ready\n");
    fflush(stdout);
    for (;;) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return 0;
}

static int dirty(long mib, long mib_per_s) {
    size_t bytes = (size_t)mib << 20, pages = bytes / PAGE;
    uint64_t *mem = malloc(bytes);
    if (!mem) { perror("malloc"); return 1; }
    memset(mem, 1, bytes); /* fault every page in, so it is real guest RAM */
    __asm__ volatile("" : : "r"(mem) : "memory"); /* ...and keep gcc from dropping the memset as unread */
    uint64_t s = 88172645463325252ULL;
    /* Pages per check interval: with a rate, dirty `budget` pages every 10 ms. */
    double budget = mib_per_s > 0 ? (double)mib_per_s * 256.0 / 100.0 : 0;
    printf("workload dirty %ld MiB%s ready\n", mib, mib_per_s > 0 ? " rate-limited" : "");
    fflush(stdout);
    uint64_t chunk = budget >= 1 ? (uint64_t)budget : 1;
    double next = now_s();
    for (uint64_t n = 0;; n++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        mem[(s % pages) * (PAGE / 8) + (n & 7)] = n;
        if (budget > 0 && (n + 1) % chunk == 0) {
            next += 0.01;
            double d = next - now_s();
            if (d > 0) { struct timespec ts = { 0, (long)(d * 1e9) }; nanosleep(&ts, NULL); }
            else if (d < -1) next = now_s();
        }
    }
    return 0;
}

static void *drain(void *arg) {
    int fd = (int)(intptr_t)arg;
    static char buf[1 << 16];
    while (read(fd, buf, sizeof buf) > 0) {}
    close(fd);
    return NULL;
}

static int netrecv(int port) {
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 16)) { perror("netrecv"); return 1; }
    printf("workload netrecv %d ready\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        pthread_t t;
        pthread_create(&t, NULL, drain, (void *)(intptr_t)c);
        pthread_detach(t);
    }
}

/* One connection attempt with a 2 s limit (a SYN nobody answers would otherwise block for minutes). */
static int connect_once(const struct sockaddr_in *a) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (const struct sockaddr *)a, sizeof *a) && errno != EINPROGRESS) { close(fd); return -1; }
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    int err = 0;
    socklen_t len = sizeof err;
    if (poll(&p, 1, 2000) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) || err) { close(fd); return -1; }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    /* A peer gone without a reset (its VM killed) shows as a drop after 30 s of unacknowledged data, not the
     * kernel's ~15 minutes; a migration's pause is far shorter. */
    unsigned timeout_ms = 30000;
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout_ms, sizeof timeout_ms);
    return fd;
}

static int send_rate(const char *ip, int port, long kib_per_s) {
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1 || port <= 0 || port > 65535 || kib_per_s <= 0) {
        fprintf(stderr, "send: want IP PORT KiB/s, got %s %d %ld\n", ip, port, kib_per_s);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    static char buf[1 << 16];
    memset(buf, 0x5a, sizeof buf);
    const double rate = kib_per_s * 1024.0; /* bytes per second */
    int announced = 0;
    for (;;) {
        int fd;
        while ((fd = connect_once(&a)) < 0) {
            struct timespec ts = { 0, 200000000L };
            nanosleep(&ts, NULL);
        }
        if (!announced) {
            printf("workload send %s:%d %ld ready\n", ip, port, kib_per_s);
            fflush(stdout);
            announced = 1;
        }
        /* Pace every 10 ms against the totals since `start`, so rounding and sleep overshoot never accumulate:
         * the long-run average is exactly the rate. More than 1 s behind (the guest paused, say, or the send
         * blocked while the peer was away) starts afresh rather than bursting to catch up. */
        double start = now_s();
        uint64_t sent = 0;
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        int broken = 0; /* the errno that ended the connection */
        while (!broken) {
            double t = now_s();
            double due = (t - start) * rate - (double)sent;
            if (due > rate) { start = t - sent / rate; due = 0; }
            while (due >= 1) {
                size_t n = due < sizeof buf ? (size_t)due : sizeof buf;
                ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
                if (w <= 0) {
                    if (w < 0 && errno == EINTR) continue;
                    broken = w < 0 ? errno : ECONNRESET;
                    break;
                }
                sent += (uint64_t)w;
                due -= (double)w;
            }
            if (broken) break;
            next.tv_nsec += 10000000L;
            if (next.tv_nsec >= 1000000000L) { next.tv_sec++; next.tv_nsec -= 1000000000L; }
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec > next.tv_sec + 1) next = now;
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {}
        }
        close(fd);
        fprintf(stderr, "workload send: connection to %s:%d lost (%s), reconnecting\n", ip, port, strerror(broken));
    }
}

/* Memory pressure: hold MiB and keep every page of it in use, so a guest with less free memory than that (its
 * balloon inflated) must swap. */
static int hog(long mib) {
    if (mib <= 0) { fprintf(stderr, "hog: MiB must be positive\n"); return 2; }
    size_t bytes = (size_t)mib << 20;
    volatile unsigned char *mem = malloc(bytes);
    if (!mem) { perror("malloc"); return 1; }
    for (uint64_t pass = 1;; pass++) {
        for (size_t off = 0; off < bytes; off += PAGE) mem[off] = (unsigned char)(pass | 1); /* never zero */
        if (pass == 1) {
            printf("workload swap %ld ready\n", mib);
            fflush(stdout);
        }
        struct timespec ts = { 0, 50000000L };
        nanosleep(&ts, NULL);
    }
}

static int disk(const char *dev) {
    int fd = open(dev, O_WRONLY);
    if (fd < 0) { perror(dev); return 1; }
    off_t size = lseek(fd, 0, SEEK_END);
    if (size <= 0) { fprintf(stderr, "%s: empty device\n", dev); return 1; }
    static char buf[1 << 20];
    memset(buf, 0x5a, sizeof buf);
    printf("workload disk %s ready\n", dev);
    fflush(stdout);
    for (off_t off = 0;; off += sizeof buf) {
        if (off + (off_t)sizeof buf > size) off = 0;
        buf[0]++;
        if (pwrite(fd, buf, sizeof buf, off) < 0) { perror("pwrite"); sleep(1); }
        if ((off >> 20) % 16 == 0) fdatasync(fd);
    }
}

static int ticks(long ms) {
    if (ms <= 0) { fprintf(stderr, "ticks: MS must be positive\n"); return 2; }
    /* Sleep to absolute deadlines, so the rate holds however long a printf takes; after a long gap (the guest
     * paused for a migration) start afresh instead of printing a burst. */
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t n = 1;; n++) {
        printf("tick %llu\n", (unsigned long long)n);
        fflush(stdout);
        next.tv_nsec += (ms % 1000) * 1000000L;
        next.tv_sec += ms / 1000 + next.tv_nsec / 1000000000L;
        next.tv_nsec %= 1000000000L;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next.tv_sec + 1) next = now;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {}
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "cpu")) return cpu();
    if (argc >= 3 && !strcmp(argv[1], "dirty")) return dirty(atol(argv[2]), argc >= 4 ? atol(argv[3]) : 0);
    if (argc >= 3 && !strcmp(argv[1], "netrecv")) return netrecv(atoi(argv[2]));
    if (argc >= 5 && !strcmp(argv[1], "send")) return send_rate(argv[2], atoi(argv[3]), atol(argv[4]));
    if (argc >= 3 && !strcmp(argv[1], "hog")) return hog(atol(argv[2]));
    if (argc >= 3 && !strcmp(argv[1], "disk")) return disk(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "ticks")) return ticks(atol(argv[2]));
    fprintf(stderr, "usage: workload cpu | dirty MiB [MiB/s] | netrecv PORT | send IP PORT KiB/s | hog MiB | disk DEVICE"
                    " | ticks MS\n");
    return 2;
}
