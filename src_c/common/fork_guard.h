/* fork_guard.h -- GNU libgomp's thread pool does not survive fork(): a child
 * that opens a parallel region waits forever for pool threads that exist only
 * in the parent.  A child handler registered with pthread_atfork marks the
 * process, and the thread policy then runs every kernel serially there.
 */
#ifndef FASTBN_FORK_GUARD_H
#define FASTBN_FORK_GUARD_H

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
static volatile int fastbn_forked_child = 0;
static void fastbn_mark_forked_child(void) { fastbn_forked_child = 1; }
static inline int fastbn_install_fork_guard(void)
{
    return pthread_atfork(NULL, NULL, fastbn_mark_forked_child);
}
static inline int fastbn_in_forked_child(void) { return fastbn_forked_child; }
#else
static inline int fastbn_install_fork_guard(void) { return 0; }
static inline int fastbn_in_forked_child(void) { return 0; }
#endif

#endif /* FASTBN_FORK_GUARD_H */
