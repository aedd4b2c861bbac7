"""The bundled scenarios. This folder is shipped inside the package as `throttle.scenarios`; read
its files with `throttle.scenario.library` (or `throttle scenarios list`), not by path."""
