# ruff: noqa  # a throwaway-style generator kept as written for the record of docs/evaluation.md
"""An independent labelled stream, written without looking at models/synth.py's choices.

Plain design: per-account lognormal amounts, Poisson arrivals with a day/night cycle, 1-3 devices,
a payee pool with Zipf use, weekly salary; UTC 'Z' timestamps; USD.
"""
import gzip
import json
import math
import random
import sys
from datetime import UTC, datetime

seed = int(sys.argv[1]); N = int(sys.argv[2]); DAYS = int(sys.argv[3]); out = sys.argv[4]
EP = int(sys.argv[5]) if len(sys.argv) > 5 else 40
import os; BIG = float(os.environ.get("BIG", "0.01"))
rng = random.Random(seed)
T0 = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
END = T0 + DAYS * 86400
events = []
cid = [0]

def emit(ts, acct, **kw):
    cid[0] += 1
    e = {"event_id": f"i{seed}-{cid[0]:08d}", "event_type": "transaction",
         "ts": datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
         "account_id": acct["id"], "currency": "USD", "account_kind": "customer", "label": 0}
    e.update(kw)
    events.append((ts, e))

def intensity(ts):
    h = ((ts - T0) % 86400) / 3600 + acct_tz
    h %= 24
    return 0.15 if h < 7 else (1.0 if h < 22 else 0.4)

accounts = []
for i in range(N):
    a = {"id": f"C{i:06d}", "mu": rng.uniform(2.5, 7.0), "sig": rng.uniform(0.35, 1.1),
         "rate": math.exp(rng.gauss(math.log(3), 0.9)),
         "devices": [f"d{i}-{k}" for k in range(rng.choice([1, 1, 2, 3]))],
         "payees": [f"P{rng.randrange(10**7):07d}" for _ in range(rng.randint(2, 25))],
         "tz": rng.choice([0, 0, 5, 8, -5]), "ip": f"10.{i % 250}.{rng.randrange(250)}.{rng.randrange(250)}",
         "country": rng.choice(["US", "US", "US", "GB", "SG"])}
    a["merchants"] = [f"M{rng.randrange(20000):05d}" for _ in range(rng.randint(5, 40))]
    accounts.append(a)

def normal_debit(a, ts):
    r = rng.random()
    dev = rng.choices(a["devices"], weights=[0.8] + [0.2 / max(1, len(a["devices"]) - 1)] * (len(a["devices"]) - 1))[0]
    amt = round(math.exp(rng.gauss(a["mu"], a["sig"])), 2)
    if r < 0.68:
        m = a["merchants"][min(int(rng.paretovariate(1.2)) - 1, len(a["merchants"]) - 1)]
        emit(ts, a, counterparty_id=m, amount=amt, direction="debit", txn_type="payment", channel="card",
             counterparty_kind="customer", device_id=dev, ip=a["ip"], country=a["country"])
    elif r < 0.90:
        p = a["payees"][min(int(rng.paretovariate(1.0)) - 1, len(a["payees"]) - 1)]
        if rng.random() < 0.04:
            p = f"P{rng.randrange(10**7):07d}"; a["payees"].append(p)
        emit(ts, a, counterparty_id=p, amount=amt, direction="debit", txn_type="transfer", channel="app",
             device_id=dev, ip=a["ip"], country=a["country"])
    else:
        emit(ts, a, counterparty_id=f"BANK-{a['id']}", amount=round(amt * rng.uniform(2, 6), 2), direction="debit",
             txn_type="withdrawal", channel="app", device_id=dev, ip=a["ip"], country=a["country"])
    if rng.random() < BIG:  # a legit big purchase now and then
        emit(ts + rng.uniform(60, 3600), a, counterparty_id=rng.choice(a["merchants"]),
             amount=round(amt * rng.uniform(4, 12), 2), direction="debit", txn_type="payment", channel="card",
             device_id=dev, ip=a["ip"], country=a["country"])

for a in accounts:
    acct_tz = a["tz"]
    ts = T0 + rng.uniform(0, 86400 / a["rate"])
    while ts < END:
        ts += rng.expovariate(a["rate"] / 86400 * 1.6)
        if rng.random() < intensity(ts) and ts < END:
            if rng.random() < 0.85:
                normal_debit(a, ts)
            else:
                emit(ts, a, counterparty_id=rng.choice(a["payees"]), amount=round(math.exp(rng.gauss(a["mu"], a["sig"])), 2),
                     direction="credit", txn_type="transfer", channel="app", device_id=None)
    day = T0 + rng.uniform(0, 7) * 86400
    while day < END:
        emit(day, a, counterparty_id=f"EMP{int(a['mu']*100)}", amount=round(math.exp(a["mu"] + 2.5), 2), direction="credit",
             txn_type="deposit", channel="bank")
        day += 7 * 86400

def start(lo, margin):
    """An episode's start: between day `lo` and `margin` days before the end; in a stream too short
    for that, in its second half (the plain range would fall after the stream's traffic ends)."""
    hi = DAYS - margin
    if hi < lo:
        lo, hi = DAYS * 0.5, DAYS - 0.05
    return T0 + rng.uniform(lo, hi) * 86400

def lab(scen, inst):
    return {"label": 1, "scenario": scen, "scenario_instance": inst}

def history_ok(a):
    return a["rate"] * 2 > 1.0

pool = [a for a in accounts if history_ok(a)]
rng.shuffle(pool)
for k in range(EP):
    a = pool.pop()
    ts = start(2.5, 0.3)
    dev, ip = f"atk-{seed}-{k}", f"185.{rng.randrange(250)}.{rng.randrange(250)}.9"
    for j in range(rng.randint(2, 6)):
        ts += rng.uniform(40, 600)
        emit(ts, a, counterparty_id=f"MULE{rng.randrange(10**6)}", amount=round(math.exp(a["mu"] + rng.uniform(0.7, 2.3)), 2),
             direction="debit", txn_type=rng.choice(["transfer", "transfer", "withdrawal"]), channel="app",
             device_id=dev, ip=ip, country=rng.choice(["RU", "NG", "BR", "US"]), **lab("account_takeover", f"ato:{a['id']}"))
for k in range(EP):
    a = pool.pop()
    ts = start(2.5, 0.3)
    for j in range(rng.randint(5, 14)):
        ts += rng.uniform(5, 90)
        emit(ts, a, counterparty_id=f"M{rng.randrange(20000, 99999)}", amount=round(rng.uniform(0.5, 4.0), 2),
             direction="debit", txn_type="payment", channel="card", device_id=a["devices"][0], ip=a["ip"],
             country=a["country"], **lab("card_testing", f"ct:{a['id']}"))
for k in range(EP):
    a = pool.pop()
    ts = start(2.5, 0.3)
    typ = rng.choice(["payment", "transfer", "withdrawal"])
    cp = rng.choice(a["merchants"]) if typ == "payment" else (rng.choice(a["payees"]) if typ == "transfer" else f"BANK-{a['id']}")
    emit(ts, a, counterparty_id=cp, amount=round(math.exp(a["mu"]) * rng.uniform(8, 40), 2), direction="debit",
         txn_type=typ, channel="app", device_id=a["devices"][0], ip=a["ip"], country=a["country"],
         **lab("spike", f"spike:{a['id']}"))
STRUCT = int(os.environ.get("STRUCT", "0"))  # structuring episodes (0: none, as in the streams first measured)
for k in range(STRUCT):
    a = pool.pop()
    ts = start(2.5, 1.0)
    inward = rng.random() < 0.5  # cash or top-ups split on the way in, or transfers and withdrawals out
    for j in range(rng.randint(3, 5)):
        ts += rng.uniform(0.3, 5) * 3600
        amt = round(10000 * rng.uniform(0.85, 0.995), 2)
        if inward:
            emit(ts, a, counterparty_id=f"BANK-{a['id']}", amount=amt, direction="credit", txn_type="deposit",
                 channel="bank", **lab("structuring", f"st:{a['id']}"))
        else:
            emit(ts, a, counterparty_id=rng.choice(a["payees"] + [f"BANK-{a['id']}"]), amount=amt, direction="debit",
                 txn_type=rng.choice(["transfer", "withdrawal"]), channel="app", device_id=a["devices"][0], ip=a["ip"],
                 country=a["country"], **lab("structuring", f"st:{a['id']}"))
# Money mules and dormant accounts (0 by default, so the streams measured before stay as they were).
MULE = int(os.environ.get("MULE", "0"))
for k in range(MULE):
    a = pool.pop()
    ts = start(1.5, 0.5)
    got = 0.0
    for j in range(rng.randint(3, 8)):  # victims' money in, from people it never dealt with
        ts += rng.uniform(0.05, 0.8) * 3600
        amt = round(math.exp(a["mu"]) * rng.uniform(1, 6), 2)
        got += amt
        emit(ts, a, counterparty_id=f"X{rng.randrange(10**8):08d}", amount=amt, direction="credit", txn_type="transfer",
             channel="app", **lab("mule", f"mule:{a['id']}"))
    left = got * rng.uniform(0.7, 0.95)
    parts = rng.randint(1, 3)
    for j in range(parts):
        ts += rng.uniform(5, 90) * 60
        how = rng.random()
        if how < 0.5:
            kw = dict(counterparty_id=f"P{rng.randrange(10**7):07d}", txn_type="transfer", channel="app")
        elif how < 0.8:
            kw = dict(counterparty_id=f"BANK-{a['id']}", txn_type="withdrawal", channel="app")
        else:  # bought crypto at an exchange it never used
            kw = dict(counterparty_id=f"M{rng.randrange(20000, 99999)}", txn_type="payment", channel="card")
        emit(ts, a, amount=round(left / parts, 2), direction="debit", device_id=a["devices"][0], ip=a["ip"],
             country=a["country"], **kw, **lab("mule", f"mule:{a['id']}"))
DORMANT = int(os.environ.get("DORMANT", "0"))
busy = [a for a in pool if a["rate"] > 2.0]
for k in range(min(DORMANT, len(busy))):
    a = busy.pop()
    pool.remove(a)
    # Quiet after a history of its own (its eighth event at least), until well into the stream.
    own = sorted(x[0] for x in events if x[1]["account_id"] == a["id"])
    lo = max(T0 + rng.uniform(0.5, 1.5) * 86400, own[min(7, len(own) - 1)] + 1)
    wake = lo + rng.uniform(0.5, 0.7) * max(END - 86400 - lo, 2 * 86400)
    events[:] = [x for x in events if not (x[1]["account_id"] == a["id"] and lo <= x[0] < wake + 6 * 3600)]
    ts = wake
    dev = f"dz-{seed}-{k}" if rng.random() < 0.5 else a["devices"][0]
    for j in range(rng.randint(1, 4)):
        if rng.random() < 0.6:
            kw = dict(counterparty_id=f"P{rng.randrange(10**7):07d}", txn_type="transfer")
        else:
            kw = dict(counterparty_id=f"BANK-{a['id']}", txn_type="withdrawal")
        emit(ts, a, amount=round(math.exp(a["mu"]) * rng.uniform(2, 10), 2), direction="debit", channel="app",
             device_id=dev, ip=a["ip"], country=a["country"], **kw, **lab("dormant", f"dormant:{a['id']}"))
        ts += rng.uniform(2, 40) * 60
events.sort(key=lambda x: x[0])
with gzip.open(out, "wt") as f:
    for _, e in events:
        f.write(json.dumps({k: v for k, v in e.items() if v is not None}) + "\n")
print(len(events), "events")
