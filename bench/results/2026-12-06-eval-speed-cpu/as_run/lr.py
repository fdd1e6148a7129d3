# ruff: noqa  (kept as run on 2026-12-06, paths written in; see ../README.md)
import time, numpy as np
from concurrent.futures import ThreadPoolExecutor
from threadpoolctl import threadpool_limits
from sklearn.linear_model import LogisticRegression
import warnings; warnings.simplefilter("ignore")
rng=np.random.default_rng(0)
X=[rng.normal(size=(n,3072)).astype(np.float32) for n in [50]*40+[500]*10]
Y=[np.arange(len(x))%10 for x in X]
def fit(i): return LogisticRegression(C=1/(len(Y[i])*1e-3), fit_intercept=False, max_iter=1000, tol=1e-4).fit(X[i],Y[i]).coef_
with threadpool_limits(1, user_api="blas"):
    for r in range(2):
        t=time.perf_counter(); a=[fit(i) for i in range(len(X))]; t1=time.perf_counter()
        with ThreadPoolExecutor(2) as ex: b=list(ex.map(fit, range(len(X))))
        t2=time.perf_counter(); print("seq %.2f s, 2 threads %.2f s, same %s" % (t1-t, t2-t1, all(np.array_equal(p,q) for p,q in zip(a,b))))
