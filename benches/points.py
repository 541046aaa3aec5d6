"""Writes M points of dimension D (seeded normal) as CSV: python3 benches/points.py M D > pts.csv"""
import random, sys
m, d = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
for _ in range(m):
    print(",".join(repr(rng.gauss(0, 1)) for _ in range(d)))
