"""What bench/continuous.py and bench/point_in_time.py share, beside bench/common.py.

`site` is the integration harness's replicating site with a random disk, the
pair's status over one Admin channel, a timed full sync and timed srctl calls;
`sampler` polls the pair's RPO and backlog and every daemon's RSS once a
second; `fio` runs fio jobs and reads their JSON; `cache` empties the page
cache of given files and times a plain sequential read; `stats` and `machine`
hold the arithmetic and the machine facts RESULTS.md records.
"""
