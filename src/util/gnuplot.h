/* gnuplot.h - draw a PNG with gnuplot without ever turning a user string
 * into gnuplot code: gnuplot is started without a shell (posix_spawnp), its
 * script comes from a pipe, and its PNG goes to its stdout, which is a file
 * we opened ourselves (a temporary name beside OUT, renamed into place). The
 * caller's script must hold only fixed text and numbers it formatted (data
 * inline as a datablock); it must say `set output` with no file name. */
#ifndef TPTT_UTIL_GNUPLOT_H
#define TPTT_UTIL_GNUPLOT_H

#include <stddef.h>

#include "util/err.h"

/* Run script (len bytes) and write its PNG to out. On failure nothing is
 * left at out and err says why (gnuplot missing, its first error line). */
int tp_gnuplot_png(const char *script, size_t len, const char *out, tp_err *err);

#endif
