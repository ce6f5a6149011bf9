#!/usr/bin/env bash
# Reference solution, run in the workdir.
set -euo pipefail
sed -i 's/calc_total/compute_total/g' shop/pricing.py shop/cart.py report.py
