"""What the live-replication benchmarks (bench/continuous.py, bench/point_in_time.py) share.

`site` starts the integration harness's replicating site with a fully random disk
and times its full sync; `sampler` polls the pair's RPO and backlog and every
daemon's RSS once a second; `fio` runs fio jobs and reads their JSON; `cache`
empties the page cache of given files and times a plain sequential read;
`stats` and `machine` hold the arithmetic and the machine facts RESULTS.md records.
"""
