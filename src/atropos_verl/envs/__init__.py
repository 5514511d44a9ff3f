"""Built-in Atropos environments (real ``atroposlib`` ``BaseEnv`` subclasses) for demos and smoke runs."""
