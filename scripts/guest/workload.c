/* qmigrate guest workload: one static binary, chosen by its arguments.
 *   workload cpu                    busy loop on one vCPU
 *   workload dirty MiB [MiB/s]      random writes over MiB of memory, as fast as possible or rate-limited
 *   workload netrecv PORT           TCP listener that discards everything it receives
 *   workload disk DEVICE            continuous writes over a block device
 *   workload ticks MS               prints "tick N" (N = 1, 2, 3, ...) every MS ms, forever
 * Each but ticks prints one "ready" line to stdout once its steady state begins. ticks prints none: it runs beside
 * another workload (init starts it for the kernel parameter ticks=MS), and a "ready" line from it would let a
 * harness think the main workload is ready. Its counter lives in guest memory, so it survives a migration, and a
 * guest that ran twice from one state, or was rolled back, shows on the consoles as a repeated or lower N. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
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
    if (argc >= 3 && !strcmp(argv[1], "disk")) return disk(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "ticks")) return ticks(atol(argv[2]));
    fprintf(stderr, "usage: workload cpu | dirty MiB [MiB/s] | netrecv PORT | disk DEVICE | ticks MS\n");
    return 2;
}
