"""Prints the time (seconds since the epoch) at which a running ringmail's queue is
empty, as its admin API's summary counts it: started before a load so that its own
start-up is not counted, it waits until a line can be read from GO (a fifo; the load
is done), then asks every 10 ms (at most 600 s).

    python3 bench/lib/queue_drained.py GO DATA/admin.addr > t2 &
"""
import json
import sys
import time
import urllib.request

open(sys.argv[1]).read()
url = f"http://{open(sys.argv[2]).read().strip()}/api/v1/queue/summary"
deadline = time.time() + 600
while time.time() < deadline:
    with urllib.request.urlopen(url) as r:
        if json.load(r)["total"]["messages"] == 0:
            break
    time.sleep(0.01)
print(f"{time.time():.6f}")
