/* test_jsonint.c - tp_json_int (util/jsonint.h): JSON numbers parsed by
 * cJSON, at and past every edge a reader of a hostile file can reach
 * (fractions, 2^53, 2^63, 1e300, the caller's bounds), accepted or refused
 * without converting out of range (UBSan build: a conversion of 2^63 to
 * int64_t would be reported here). */
#include <cjson/cJSON.h>
#include <stdint.h>

#include "test.h"
#include "util/jsonint.h"

/* parse text as one JSON value and run tp_json_int on it */
static int conv(const char *text, int64_t lo, int64_t hi, int64_t *out) {
    cJSON *j = cJSON_Parse(text);
    int ok = tp_json_int(j, lo, hi, out);
    cJSON_Delete(j);
    return ok;
}

int main(void) {
    int64_t v = 0;
    CHECK(conv("0", 0, 10, &v) && v == 0);
    CHECK(conv("-0.0", 0, 10, &v) && v == 0);
    CHECK(conv("10", 0, 10, &v) && v == 10);
    CHECK(conv("1e1", 0, 10, &v) && v == 10);
    v = 77;
    CHECK(!conv("11", 0, 10, &v) && v == 77); /* refused: *out untouched */
    CHECK(!conv("-1", 0, 10, &v) && v == 77);
    CHECK(!conv("1.5", 0, 10, &v) && v == 77);
    CHECK(!conv("\"3\"", 0, 10, &v));
    CHECK(!conv("true", 0, 10, &v));
    CHECK(!conv("null", 0, 10, &v));
    CHECK(!conv("[3]", 0, 10, &v));
    CHECK(!tp_json_int(NULL, 0, 10, &v));
    CHECK(!conv("1e999", 0, INT64_MAX, &v)); /* strtod: infinity */
    CHECK(!conv("-1e999", INT64_MIN, 0, &v));
    CHECK(!conv("1e300", INT64_MIN, INT64_MAX, &v));
    /* the int64 edge: 2^63 is a double but no int64_t, even for hi = INT64_MAX */
    CHECK(!conv("9223372036854775808", INT64_MIN, INT64_MAX, &v));
    CHECK(!conv("1.38831e+19", INT64_MIN, INT64_MAX, &v)); /* the fuzzer's input */
    CHECK(!conv("-9223372036854775808", INT64_MIN, INT64_MAX, &v));
    CHECK(conv("9223372036854774784", INT64_MIN, INT64_MAX, &v) && v == INT64_C(9223372036854774784));
    CHECK(conv("9007199254740992", 0, INT64_C(1) << 53, &v) && v == INT64_C(1) << 53);
    CHECK(!conv("9007199254740994", 0, INT64_C(1) << 53, &v));
    CHECK(conv("-4194304", -4194304, 4194304, &v) && v == -4194304);
    CHECK(!conv("4194305", 1, 4194304, &v));
    CHECK(!conv("2147483648", INT32_MIN, INT32_MAX, &v));
    CHECK(conv("-2147483648", INT32_MIN, INT32_MAX, &v) && v == INT32_MIN);
    return tp_test_report("test_jsonint");
}
