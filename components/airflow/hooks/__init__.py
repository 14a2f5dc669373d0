from imlt.components.airflow.hooks.oss import ImltOssHook

__all__ = ["ImltOssHook"]
