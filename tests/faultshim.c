/* faultshim: an LD_PRELOAD library that makes system calls stall or lie, for tests.
 *
 * Every behaviour is off unless its variable is set (read once, on first use):
 *   FAULTSHIM_STALL_FILE=/abs/path  while that file exists, fsync and fdatasync block
 *                                   (polling every 20 ms), then run: a hung NFS hard mount.
 *   FAULTSHIM_STALL_MAX_S=600       the longest one call blocks.
 *   FAULTSHIM_LIE_RENAME=substr     rename/renameat/renameat2 with substr in either path:
 *                                   run the call, then on success report failure (a
 *                                   retransmitted NFS RENAME answers ENOENT after the fact).
 *   FAULTSHIM_LIE_UNLINK=substr     the same for unlink/unlinkat/rmdir.
 *   FAULTSHIM_KILL_RENAME=substr    a rename with substr in its *new* path: SIGKILL the
 *                                   process before the call runs (a crash at that step).
 *   FAULTSHIM_FAIL_RENAME=substr    a rename with substr in its *new* path fails without
 *                                   running, errno FAULTSHIM_FAIL_ERRNO (default 28,
 *                                   ENOSPC: a full disk whose directory cannot grow).
 *   FAULTSHIM_FAIL_TIMES=0          fail only the first N such renames (0: every one).
 *   FAULTSHIM_LIE_EVERY=1           lie on every Nth matching success (separate counters).
 *   FAULTSHIM_LIE_ERRNO=2           the errno of the lie (ENOENT).
 *   FAULTSHIM_CLOCK_OFFSET_S=-300   shift CLOCK_REALTIME (clock_gettime, gettimeofday,
 *                                   time) and nothing else: a skewed wall clock whose
 *                                   monotonic clock and sleeps stay true.
 *   FAULTSHIM_LOG=/abs/path         one line per injected fault, O_APPEND.
 * Paths are matched as the caller passed them (relative to a dirfd for the *at calls).
 * CPython 3.11 calls exactly these entry points: rename (os.rename/os.replace),
 * renameat (with dir_fd), unlink, unlinkat (dir_fd, rmdir with dir_fd), rmdir, fsync,
 * fdatasync; renameat2 is wrapped for other callers.
 *
 * Build: cc -shared -fPIC -O2 -Wall -o faultshim.so faultshim.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static struct {
    const char *stall_file;
    double stall_max_s;
    const char *lie_rename;
    const char *lie_unlink;
    const char *kill_rename;
    const char *fail_rename;
    int fail_errno;
    long fail_times;
    long lie_every;
    int lie_errno;
    const char *log;
    long long clock_offset_ns; /* 0: the clock is left alone */
} cfg;

static struct {
    int (*fsync)(int);
    int (*fdatasync)(int);
    int (*rename)(const char *, const char *);
    int (*renameat)(int, const char *, int, const char *);
    int (*renameat2)(int, const char *, int, const char *, unsigned int);
    int (*unlink)(const char *);
    int (*unlinkat)(int, const char *, int);
    int (*rmdir)(const char *);
    int (*clock_gettime)(clockid_t, struct timespec *);
    int (*gettimeofday)(struct timeval *restrict, void *restrict);
    time_t (*time)(time_t *);
} real;

static long renames_seen, unlinks_seen, renames_failed;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static const char *env(const char *name) {
    const char *v = getenv(name);
    return v != NULL && *v != '\0' ? strdup(v) : NULL;
}

static void load(void) {
    real.fsync = dlsym(RTLD_NEXT, "fsync");
    real.fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real.rename = dlsym(RTLD_NEXT, "rename");
    real.renameat = dlsym(RTLD_NEXT, "renameat");
    real.renameat2 = dlsym(RTLD_NEXT, "renameat2");
    real.unlink = dlsym(RTLD_NEXT, "unlink");
    real.unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    real.rmdir = dlsym(RTLD_NEXT, "rmdir");
    real.clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    real.gettimeofday = dlsym(RTLD_NEXT, "gettimeofday");
    real.time = dlsym(RTLD_NEXT, "time");

    const char *v;
    cfg.stall_file = env("FAULTSHIM_STALL_FILE");
    cfg.stall_max_s = (v = env("FAULTSHIM_STALL_MAX_S")) ? atof(v) : 600.0;
    cfg.lie_rename = env("FAULTSHIM_LIE_RENAME");
    cfg.lie_unlink = env("FAULTSHIM_LIE_UNLINK");
    cfg.kill_rename = env("FAULTSHIM_KILL_RENAME");
    cfg.fail_rename = env("FAULTSHIM_FAIL_RENAME");
    cfg.fail_errno = (v = env("FAULTSHIM_FAIL_ERRNO")) ? atoi(v) : ENOSPC;
    cfg.fail_times = (v = env("FAULTSHIM_FAIL_TIMES")) ? atol(v) : 0;
    cfg.lie_every = (v = env("FAULTSHIM_LIE_EVERY")) ? atol(v) : 1;
    if (cfg.lie_every < 1)
        cfg.lie_every = 1;
    cfg.lie_errno = (v = env("FAULTSHIM_LIE_ERRNO")) ? atoi(v) : ENOENT;
    cfg.log = env("FAULTSHIM_LOG");
    cfg.clock_offset_ns = (v = env("FAULTSHIM_CLOCK_OFFSET_S")) ? (long long)(atof(v) * 1e9) : 0;
}

static void init(void) { pthread_once(&once, load); }

/* One write(2) per line, so lines from several threads or processes never interleave. */
static void note(const char *fmt, ...) {
    if (cfg.log == NULL)
        return;
    int saved = errno;
    char line[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    int fd = open(cfg.log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t w = write(fd, line, (size_t)n);
        (void)w;
        close(fd);
    }
    errno = saved;
}

static double monotonic_s(void) {
    struct timespec ts;
    real.clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void stall(const char *call, int fd) {
    init();
    if (cfg.stall_file == NULL)
        return;
    int saved = errno;
    if (access(cfg.stall_file, F_OK) == 0) {
        note("stall %s fd=%d", call, fd);
        double deadline = monotonic_s() + cfg.stall_max_s;
        struct timespec tick = {0, 20 * 1000 * 1000};
        while (access(cfg.stall_file, F_OK) == 0 && monotonic_s() < deadline)
            nanosleep(&tick, NULL);
    }
    errno = saved;
}

static int matches(const char *pattern, const char *a, const char *b) {
    return pattern != NULL && ((a != NULL && strstr(a, pattern) != NULL) ||
                               (b != NULL && strstr(b, pattern) != NULL));
}

/* After a real call's result rc: whether to turn its success into a lie. */
static int lie(int rc, const char *pattern, long *seen, const char *a, const char *b) {
    if (rc != 0 || !matches(pattern, a, b))
        return 0;
    if (__atomic_add_fetch(seen, 1, __ATOMIC_SEQ_CST) % cfg.lie_every != 0)
        return 0;
    if (b != NULL)
        note("lie rename %s -> %s", a, b);
    else
        note("lie unlink %s", a);
    errno = cfg.lie_errno;
    return 1;
}

int fsync(int fd) {
    stall("fsync", fd);
    return real.fsync(fd);
}

int fdatasync(int fd) {
    stall("fdatasync", fd);
    return real.fdatasync(fd);
}

/* A crash at exactly this step: nothing after the kill runs, the rename included. */
static void kill_before(const char *new) {
    if (cfg.kill_rename != NULL && strstr(new, cfg.kill_rename) != NULL) {
        note("kill before rename to %s", new);
        kill(getpid(), SIGKILL);
    }
}

/* A rename that fails for real (nothing moves): 1 with errno set. */
static int fail_before(const char *new) {
    if (cfg.fail_rename != NULL && strstr(new, cfg.fail_rename) != NULL) {
        if (cfg.fail_times > 0 &&
            __atomic_add_fetch(&renames_failed, 1, __ATOMIC_SEQ_CST) > cfg.fail_times)
            return 0;
        note("fail rename to %s", new);
        errno = cfg.fail_errno;
        return 1;
    }
    return 0;
}

int rename(const char *old, const char *new) {
    init();
    kill_before(new);
    if (fail_before(new))
        return -1;
    int rc = real.rename(old, new);
    return lie(rc, cfg.lie_rename, &renames_seen, old, new) ? -1 : rc;
}

int renameat(int olddirfd, const char *old, int newdirfd, const char *new) {
    init();
    kill_before(new);
    if (fail_before(new))
        return -1;
    int rc = real.renameat(olddirfd, old, newdirfd, new);
    return lie(rc, cfg.lie_rename, &renames_seen, old, new) ? -1 : rc;
}

int renameat2(int olddirfd, const char *old, int newdirfd, const char *new, unsigned int flags) {
    init();
    kill_before(new);
    if (fail_before(new))
        return -1;
    int rc = real.renameat2(olddirfd, old, newdirfd, new, flags);
    return lie(rc, cfg.lie_rename, &renames_seen, old, new) ? -1 : rc;
}

int unlink(const char *path) {
    init();
    int rc = real.unlink(path);
    return lie(rc, cfg.lie_unlink, &unlinks_seen, path, NULL) ? -1 : rc;
}

int unlinkat(int dirfd, const char *path, int flags) {
    init();
    int rc = real.unlinkat(dirfd, path, flags);
    return lie(rc, cfg.lie_unlink, &unlinks_seen, path, NULL) ? -1 : rc;
}

int rmdir(const char *path) {
    init();
    int rc = real.rmdir(path);
    return lie(rc, cfg.lie_unlink, &unlinks_seen, path, NULL) ? -1 : rc;
}

/* The wall clock only: CPython's time.monotonic(), sleeps and lock timeouts use
 * CLOCK_MONOTONIC, so they keep real time. */
static int is_wall(clockid_t id) { return id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE; }

int clock_gettime(clockid_t id, struct timespec *ts) {
    init();
    int rc = real.clock_gettime(id, ts);
    if (rc == 0 && cfg.clock_offset_ns != 0 && is_wall(id)) {
        long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + cfg.clock_offset_ns;
        ts->tv_sec = (time_t)(ns / 1000000000LL);
        ts->tv_nsec = (long)(ns % 1000000000LL);
    }
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    init();
    int rc = real.gettimeofday(tv, tz);
    if (rc == 0 && cfg.clock_offset_ns != 0) {
        long long us = (long long)tv->tv_sec * 1000000LL + tv->tv_usec + cfg.clock_offset_ns / 1000;
        tv->tv_sec = (time_t)(us / 1000000LL);
        tv->tv_usec = (suseconds_t)(us % 1000000LL);
    }
    return rc;
}

time_t time(time_t *out) {
    init();
    time_t t = real.time(NULL) + (time_t)(cfg.clock_offset_ns / 1000000000LL);
    if (out != NULL)
        *out = t;
    return t;
}
