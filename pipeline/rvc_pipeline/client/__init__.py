"""The cluster client: `rvc-pipeline submit|watch|status|logs|download|cancel|list` (and `kubectl rvc`).

Torch-free (it needs pydantic, PyYAML, boto3, and the `client` extra: kubernetes and rich).
overrides: the spec from defaults, -f and --set; upload: the dataset folder to S3; kube: the cluster behind
one small protocol; view: status snapshots -> rich renderables; commands: one function per command; cli:
argparse.
"""
