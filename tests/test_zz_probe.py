import time
from celery import Signature
from celery_ordered import StreamEmpty

def test_probe(worker, make_stream, start_worker, app):
    t = time.monotonic()
    w = start_worker(concurrency=1)
    print("start_worker took", time.monotonic() - t)
    s = make_stream(window=8)
    s.put(Signature("tests.tasks.no_such_task", args=(1,), app=app))
    try:
        print(s.get(timeout=5))
    except StreamEmpty as e:
        print("stalled", e)
    print(s.stats())
    print(worker.output()[-2000:])
