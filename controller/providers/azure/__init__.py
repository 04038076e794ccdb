"""The Azure provider: compute operations (compute.py) and job steps built on them (steps.py).

Storage (page-blob disks, snapshot recovery points) lives in
`siterecovery.common.azure`, because the process server writes it too.
"""
