/* Native stack trace on a crash, for any program (python, lmp, ...), via LD_PRELOAD.
 *
 * Build (plain gcc, no dependencies):
 *   gcc -shared -fPIC -O0 -g benchmarks/segv_backtrace.c -o /tmp/segv_backtrace.so -ldl
 * Use:
 *   LD_PRELOAD=/tmp/segv_backtrace.so python -m pytest -q -x tests/test_ops.py -k bad_shape
 *   LD_PRELOAD=/tmp/segv_backtrace.so python -c "import ctypes; ctypes.string_at(0)"  # demo
 *
 * A constructor installs SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGABRT handlers (sigaction, on an
 * alternate signal stack so a stack overflow still reports) that write the signal, the
 * faulting address and up to 64 frames of backtrace_symbols_fd() to stderr, then restore the
 * default action and re-raise, so the process still dies with the same signal (core dump, exit
 * status 139/134 as before). Frames inside shared libraries print as lib.so(+0xOFFSET); turn
 * them into function/line with `addr2line -f -C -e lib.so 0xOFFSET` (or `c++filt` on the
 * mangled names shown). Python's faulthandler (python -X faulthandler; pytest enables it) is
 * compatible: it prints the Python traceback, restores the previous handler (this one) and
 * re-raises, and the native frames of the crash still show below its signal frame.
 * SEGV_BACKTRACE_QUIET=1 silences the one "installed" line printed at start-up.
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_FRAMES 64

static void write_str(const char* s) {
  ssize_t r = write(STDERR_FILENO, s, strlen(s));
  (void)r;
}

/* Async-signal-safe hex formatting (no printf in the handler). */
static void write_hex(unsigned long v) {
  char buf[2 + 2 * sizeof(unsigned long) + 1];
  int n = sizeof(buf) - 1;
  buf[n] = '\0';
  do {
    buf[--n] = "0123456789abcdef"[v & 0xf];
    v >>= 4;
  } while (v && n > 2);
  buf[--n] = 'x';
  buf[--n] = '0';
  write_str(buf + n);
}

static void write_dec(long v) {
  char buf[24];
  int n = sizeof(buf) - 1;
  int neg = v < 0;
  unsigned long u = neg ? (unsigned long)(-v) : (unsigned long)v;
  buf[n] = '\0';
  do {
    buf[--n] = (char)('0' + u % 10);
    u /= 10;
  } while (u && n > 1);
  if (neg) buf[--n] = '-';
  write_str(buf + n);
}

static void handler(int sig, siginfo_t* info, void* ctx) {
  (void)ctx;
  void* frames[MAX_FRAMES];
  write_str("\n=== segv_backtrace: caught signal ");
  write_dec(sig);
  write_str(" (");
  write_str(sig == SIGSEGV ? "SIGSEGV"
            : sig == SIGABRT ? "SIGABRT"
            : sig == SIGBUS  ? "SIGBUS"
            : sig == SIGFPE  ? "SIGFPE"
            : sig == SIGILL  ? "SIGILL"
                             : "?");
  write_str("), pid ");
  write_dec((long)getpid());
  if (info && sig != SIGABRT) {
    write_str(", fault address ");
    write_hex((unsigned long)info->si_addr);
  }
  write_str("\n");
  int n = backtrace(frames, MAX_FRAMES);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  write_str("=== segv_backtrace: end of stack (");
  write_dec(n);
  write_str(" frames); re-raising with the default handler\n");
  /* Default action, then re-raise: the process dies of the same signal as without us. */
  struct sigaction dfl;
  memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, NULL);
  sigset_t unblock;
  sigemptyset(&unblock);
  sigaddset(&unblock, sig);
  sigprocmask(SIG_UNBLOCK, &unblock, NULL);
  raise(sig);
  _exit(128 + sig); /* not reached for these signals */
}

__attribute__((constructor)) static void segv_backtrace_install(void) {
  /* backtrace() loads libgcc_s lazily (a malloc); do it now, not inside the handler. */
  void* warm[2];
  backtrace(warm, 2);

  static char alt_stack[1 << 16];
  stack_t ss;
  memset(&ss, 0, sizeof(ss));
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof(alt_stack);
  sigaltstack(&ss, NULL);

  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
  for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); ++i) sigaction(sigs[i], &sa, NULL);
  if (getenv("SEGV_BACKTRACE_QUIET") == NULL)
    write_str("segv_backtrace: SIGSEGV/SIGBUS/SIGFPE/SIGILL/SIGABRT handlers installed\n");
}
