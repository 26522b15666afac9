"""The HTTP API's engine lock serves waiting requests in arrival order."""

import threading
import time

from agent.http_api import FifoLock


def test_waiters_get_the_lock_in_arrival_order():
    lock, order, started = FifoLock(), [], []
    lock.acquire()

    def worker(i):
        started.append(i)
        with lock:
            order.append(i)

    threads = []
    for i in range(8):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        while len(started) <= i or len(lock._waiters) <= i:  # queued before the next one starts
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == list(range(8))


def test_release_without_waiters_frees_the_lock():
    lock = FifoLock()
    with lock:
        pass
    done = threading.Event()
    threading.Thread(target=lambda: (lock.acquire(), done.set())).start()
    assert done.wait(2)
