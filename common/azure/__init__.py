"""Azure pieces both sides use: site settings and credentials, error mapping and
retries, page-blob disks and their snapshots as recovery points.

The process server writes replicated disks into page blobs (`pageblob`) and
marks recovery points as blob snapshots (`points`); the configuration server
lists those points and creates managed disks and VMs from them
(`siterecovery.controller.providers.azure`). Nothing here does anything at
import time beyond importing the Azure SDK.
"""
