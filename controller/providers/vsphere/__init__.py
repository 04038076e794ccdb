"""The vSphere provider (pyvmomi): sessions, discovery, operations and preflight facts.

Modules: `session` (login, trust, retries, re-login), `properties` (bulk
reads), `discovery` (→ `model.Inventory`), `privileges` (effective
privileges from permissions and roles), `operations` (what failback changes),
`facts` (what the failback preflight asks).
"""
