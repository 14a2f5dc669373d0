from components.airflow.hooks.oss import ImltOssHook

__all__ = ["ImltOssHook"]
