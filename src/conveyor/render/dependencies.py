"""The order apps wait for each other in, checked before anything is applied.

Dependencies come from HelmReleases' and Flux Kustomizations' `dependsOn`, and from the
Kustomization that built an app. A Kustomization's `healthChecks` may name HelmReleases
and Kustomizations (conveyor's apps): whatever depends on it waits for those as well,
which is what Flux's readiness of that Kustomization would mean. A cycle would make its
apps wait for each other forever, so each app in one fails to render, naming its file.
"""

from __future__ import annotations

from conveyor.render.documents import RenderError
from conveyor.render.render import RenderedApp


def resolve_dependencies(rendered: dict[str, RenderedApp | RenderError]) -> None:
    """Complete each app's dependencies (in place) and turn the apps of a cycle into
    RenderErrors that name the cycle."""
    apps = {name: app for name, app in rendered.items() if isinstance(app, RenderedApp)}
    for app in apps.values():
        for dependency in list(app.depends_on):
            target = apps.get(dependency)
            if target is None:
                continue
            for health in target.source.health_apps:
                if health != app.name and health not in app.depends_on:
                    app.depends_on.append(health)
    for name, app in apps.items():
        cycle = _cycle_through(name, apps)
        if cycle:
            file, line = app.source.where()
            rendered[name] = RenderError(
                f"dependsOn cycle: {' → '.join(cycle)}; none of these apps is applied",
                file=file,
                line=line,
            )


def _cycle_through(start: str, apps: dict[str, RenderedApp]) -> list[str]:
    """The path from `start` back to itself along dependencies, or [] when none."""
    path = [start]
    seen = {start}

    def walk(name: str) -> bool:
        for dependency in apps[name].depends_on:
            if dependency == start:
                path.append(start)
                return True
            if dependency in seen or dependency not in apps:
                continue
            seen.add(dependency)
            path.append(dependency)
            if walk(dependency):
                return True
            path.pop()
        return False

    return path if walk(start) else []
