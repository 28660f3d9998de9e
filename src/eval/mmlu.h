/* mmlu.h - MMLU data and metrics for `tptt eval mmlu`: reading the
 * questions, few-shot prompts, HELM's generative metrics and the mean with
 * its standard error. Running the model is the caller's part.
 *
 * Prompt (tp_mmlu_prompt), the format of Hendrycks et al.'s evaluate.py
 * (hendrycks/test), lm-evaluation-harness (EleutherAI/lm-evaluation-harness,
 * lm_eval/tasks/mmlu/default/_default_template_yaml + mmlu_<subject>.yaml
 * "description") and lighteval's `mmlu_harness` prompt
 * (huggingface/lighteval, src/lighteval/tasks/default_prompts.py):
 *
 *   The following are multiple choice questions (with answers) about {subject, _ -> space}.\n\n
 *   {shot question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {letter}\n\n     (per shot)
 *   {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:
 *
 * Log-likelihood scoring (lm-evaluation-harness: output_type multiple_choice,
 * doc_to_choice ["A","B","C","D"], target_delimiter " ", fewshot_delimiter
 * "\n\n", fewshot sampler first_n over the dev split) scores the four
 * continuations tp_mmlu_target(i) = " A" .. " D" after that prompt; lighteval
 * scores the same strings (choices=[" A", " B", " C", " D"]).
 *
 * Generative scoring (tp_mmlu_gen_scores): HELM's exact_match,
 * prefix_exact_match, quasi_exact_match and quasi_prefix_exact_match of the
 * generated continuation against the gold letter; see mmlu.c for the
 * definitions and their quirks. */
#ifndef TPTT_EVAL_MMLU_H
#define TPTT_EVAL_MMLU_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

typedef struct tp_mmlu_item {
    char *subject;    /* "abstract_algebra" (underscores as in the file names); "all" if a JSONL record has none */
    char *question;
    char *choices[4]; /* A, B, C, D */
    int answer;       /* 0..3 */
    char *file;       /* the file the item came from */
    int64_t line;     /* 1-based line where its CSV row / JSONL record starts */
} tp_mmlu_item;

typedef struct tp_mmlu_set {
    tp_mmlu_item *items;
    size_t n;
    int quiet; /* set by the caller before reading: 1 = skipped rows are counted but not printed
                  (every MPI rank reads the files; rank 0 speaks) */
} tp_mmlu_set;

/* Free every item and the array; the set becomes empty. NULL is a no-op. */
void tp_mmlu_set_free(tp_mmlu_set *s);

/* Read the original MMLU layout, DIR/<split>/<subject>_<split>.csv, split
 * "dev", "test" or "val" (any name without '/' is accepted), subjects sorted
 * by name, rows in file order. CSV per RFC 4180 without a header: rows
 * question,A,B,C,D,answer; fields may be quoted ("" for a quote, commas and
 * line breaks inside); LF, CRLF or CR line ends; a UTF-8 BOM at the start of a
 * file is skipped; blank lines are ignored; characters after a closing quote
 * are kept (as Python's csv module does). Fields are kept verbatim.
 *
 * A row with a number of fields other than 6, an answer that is not A, B, C
 * or D after trimming spaces, a NUL byte or invalid UTF-8 is skipped and
 * counted in *skipped (may be NULL), with a line on stderr naming
 * file:line (the row's first line) for the first 10 skipped rows of the call.
 *
 * Errors: DIR/<split> missing or unreadable, no <subject>_<split>.csv file in
 * it, a file ending inside a quoted field ("file:line: unterminated quoted
 * field", the line where the quote opened), no usable row at all. On error
 * *out is empty. */
int tp_mmlu_read_dir(const char *dir, const char *split, tp_mmlu_set *out, int64_t *skipped, tp_err *err);

/* Read JSONL: one object per line, {"subject": s, "question": q, "choices":
 * [4 strings], "answer": 0..3 or "A".."D"}; "subject" missing or null ->
 * "all". Blank lines are ignored; a bad line (invalid JSON, a missing or
 * mistyped field, a string holding NUL, an empty subject) is skipped and
 * counted as in tp_mmlu_read_dir. Items keep file order. Errors: the file
 * cannot be read, no usable record. */
int tp_mmlu_read_jsonl(const char *path, tp_mmlu_set *out, int64_t *skipped, tp_err *err);

/* The first k items of dev whose subject is `subject`, in order, as an array
 * the caller frees (the items stay owned by dev). *got receives how many
 * (fewer than k when the subject has fewer; the caller decides whether to
 * warn). Returns NULL with *got = 0 when there are none or k <= 0, and NULL
 * with *got = -1 when the array cannot be allocated. */
const tp_mmlu_item **tp_mmlu_shots(const tp_mmlu_set *dev, const char *subject, int k, int *got);

/* The prompt for item after nshots shots (format above; the header names
 * item's subject), ending in "Answer:" with no trailing space. malloc'ed
 * (caller frees); NULL if out of memory. */
char *tp_mmlu_prompt(const tp_mmlu_item *item, const tp_mmlu_item *const *shots, int nshots);

/* " A", " B", " C", " D" (lm-evaluation-harness target_delimiter + choice):
 * the continuations whose log-likelihoods are compared; NULL outside 0..3. */
const char *tp_mmlu_target(int choice);

/* HELM's four generative scores (0 or 1) of one continuation. */
typedef struct tp_mmlu_gen {
    int em;   /* exact_match */
    int pem;  /* prefix_exact_match */
    int qem;  /* quasi_exact_match */
    int pqem; /* quasi_prefix_exact_match */
} tp_mmlu_gen;

/* Score continuation[0..n) (the generated text, may hold NUL) against the
 * gold letter "A".."D" (gold 0..3; any other value scores 0 everywhere). */
void tp_mmlu_gen_scores(const char *continuation, size_t n, int gold, tp_mmlu_gen *s);

/* HELM's normalize_text of in[0..n) (UTF-8): lower-case (ASCII only; other
 * bytes are kept), remove ASCII punctuation (Python's string.punctuation),
 * remove the articles a/an/the as whole words, collapse whitespace runs to
 * one space and trim. Writes at most cap-1 bytes and a NUL (when cap > 0) and
 * returns the full length, like snprintf. */
size_t tp_helm_normalize(const char *in, size_t n, char *out, size_t cap);

/* Mean of x[0..n) and its standard error sqrt(s^2 / n), s^2 the sample
 * variance (n - 1); the error is 0 for n < 2 and both are 0 for n = 0.
 * Either output may be NULL. */
void tp_mmlu_stats(const double *x, size_t n, double *mean, double *stderr_);

#endif
