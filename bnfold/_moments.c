/* The moments of a BN input in one read: bnfold's recalibration kernel (see bnfold/pytorch/recalibrate.py).
 *
 * For a float32 array of shape (samples, channels, positions), C-contiguous, it gives each row's (sample
 * and channel's) sum and M2 (sum of squared deviations from the row's own mean), in float64, and each
 * channel's mean and population variance over all its values (Chan's update over the samples), in float32
 * for the normalization. Each row is read from memory once: the second pass over it hits the cache.
 *
 * Exact at any offset: a row is summed about its first value and squared about its own mean, in float
 * lanes flushed to double every BLOCK values, so rounding scales with the row's spread, not its size.
 * torch would need three passes (a sum, a subtraction written out, a norm) or its BN kernels' scalar loops.
 *
 * Built as an optional extension (pyproject.toml): without a C compiler bnfold uses those torch passes.
 * Python's own CFLAGS carry -fwrapv, which stops gcc vectorizing the lanes (six times slower): the build
 * turns it off again (-fno-wrapv); nothing here relies on signed overflow.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>

#define LANES 16
#define BLOCK 256
/* Below this many values a call is not worth a thread. */
#define VALUES_PER_THREAD (1 << 18)
#define MAX_THREADS 64

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTORIZED __attribute__((target_clones("avx2", "default")))
#else
#define VECTORIZED
#endif

/* The sum of (row[i] - centre), or of its squares: float lanes of at most BLOCK / LANES values each,
   flushed to double. Inlined into each caller with `square` constant, so each loop is vectorized. */
static inline __attribute__((always_inline)) double lane_sum(const float *row, int64_t n, float centre, int square) {
    double total = 0.0;
    int64_t i = 0;
    while (n - i >= LANES) {
        float lane[LANES] = {0};
        int64_t end = n - i >= BLOCK ? i + BLOCK : n - (n - i) % LANES;
        for (; i < end; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float d = row[i + j] - centre;
                lane[j] += square ? d * d : d;
            }
        for (int j = 0; j < LANES; j++) total += lane[j];
    }
    for (; i < n; i++) {
        double d = (double)row[i] - centre;
        total += square ? d * d : d;
    }
    return total;
}

VECTORIZED static double shifted_sum(const float *row, int64_t n, float shift) { return lane_sum(row, n, shift, 0); }

VECTORIZED static double squared_deviations(const float *row, int64_t n, float centre) {
    return lane_sum(row, n, centre, 1);
}

typedef struct {
    const float *values;
    int64_t first, last, positions;
    double *sums, *m2;
} Rows;

static void *row_moments(void *arg) {
    const Rows *rows = (const Rows *)arg;
    for (int64_t r = rows->first; r < rows->last; r++) {
        const float *row = rows->values + r * rows->positions;
        double n = (double)rows->positions;
        double sum = shifted_sum(row, rows->positions, row[0]) + n * row[0];
        double mean = sum / n;
        float centre = (float)mean;
        double off = mean - (double)centre; /* the centre's rounding, taken out exactly: */
        rows->sums[r] = sum;                /* sum (x - c)^2 = M2 + n (mean - c)^2 */
        rows->m2[r] = squared_deviations(row, rows->positions, centre) - n * off * off;
        if (rows->m2[r] < 0.0) rows->m2[r] = 0.0;
    }
    return NULL;
}

/* Rows split over up to `threads` threads (the caller's one among them). */
static void all_row_moments(const float *values, int64_t rows, int64_t positions, double *sums, double *m2,
                            int threads) {
    int64_t wanted = rows * positions / VALUES_PER_THREAD;
    if (threads > wanted) threads = (int)(wanted > 1 ? wanted : 1);
    if (threads > rows) threads = (int)rows;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    Rows shares[MAX_THREADS];
    pthread_t workers[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        shares[t] = (Rows){values, rows * t / threads, rows * (t + 1) / threads, positions, sums, m2};
        if (t > 0) started[t] = pthread_create(&workers[t], NULL, row_moments, &shares[t]) == 0;
    }
    row_moments(&shares[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(workers[t], NULL);
        else row_moments(&shares[t]); /* no thread to be had: this one does the share */
    }
}

static void channel_moments(const double *sums, const double *m2, int64_t samples, int64_t channels,
                            int64_t positions, float *mean, float *var) {
    double n = (double)positions;
    for (int64_t c = 0; c < channels; c++) {
        double total = 0.0, within = 0.0, between = 0.0;
        for (int64_t s = 0; s < samples; s++) {
            total += sums[s * channels + c];
            within += m2[s * channels + c];
        }
        double centre = total / (n * (double)samples);
        for (int64_t s = 0; s < samples; s++) {
            double d = sums[s * channels + c] / n - centre;
            between += d * d;
        }
        mean[c] = (float)centre;
        var[c] = (float)((within + n * between) / (n * (double)samples));
    }
}

static int sized(const Py_buffer *buffer, int64_t items, Py_ssize_t itemsize, const char *name) {
    if (buffer->len != (Py_ssize_t)(items * itemsize) || !PyBuffer_IsContiguous(buffer, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: expected %lld contiguous items of %zd bytes", name,
                     (long long)items, itemsize);
        return 0;
    }
    return 1;
}

static PyObject *batch_moments(PyObject *self, PyObject *args) {
    Py_buffer values, sums, m2, mean, var;
    long long samples, channels, positions;
    int threads;
    if (!PyArg_ParseTuple(args, "y*LLLw*w*w*w*i", &values, &samples, &channels, &positions, &sums, &m2, &mean,
                          &var, &threads))
        return NULL;
    PyObject *result = NULL;
    int64_t rows = samples * channels;
    if (samples < 1 || channels < 1 || positions < 1) {
        PyErr_SetString(PyExc_ValueError, "samples, channels and positions must be positive");
    } else if (sized(&values, rows * positions, sizeof(float), "values") && sized(&sums, rows, sizeof(double), "sums")
               && sized(&m2, rows, sizeof(double), "m2") && sized(&mean, channels, sizeof(float), "mean")
               && sized(&var, channels, sizeof(float), "var")) {
        Py_BEGIN_ALLOW_THREADS
        all_row_moments((const float *)values.buf, rows, positions, (double *)sums.buf, (double *)m2.buf, threads);
        channel_moments((const double *)sums.buf, (const double *)m2.buf, samples, channels, positions,
                        (float *)mean.buf, (float *)var.buf);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&sums);
    PyBuffer_Release(&m2);
    PyBuffer_Release(&mean);
    PyBuffer_Release(&var);
    return result;
}

static PyMethodDef methods[] = {
    {"batch_moments", batch_moments, METH_VARARGS,
     "batch_moments(values, samples, channels, positions, sums, m2, mean, var, threads): per row of the float32 "
     "values its float64 sum and M2 into sums and m2, per channel the float32 mean and population variance."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_moments", NULL, -1, methods};

PyMODINIT_FUNC PyInit__moments(void) { return PyModule_Create(&module); }
