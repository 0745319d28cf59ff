"""The ``sitecustomize.py`` of :func:`lanton_dist.profiling.command.profile_command`.

``profile_command`` copies this file as ``sitecustomize.py`` into a directory it puts first on
the wrapped command's ``PYTHONPATH``; every Python process the command starts then runs it at
start-up (unless started with ``-S``/``-I``). As ``sitecustomize`` it

* registers a meta-path finder that, right after ``torch.optim.optimizer`` is loaded, adds
  global optimizer step hooks calling :func:`lanton_dist.profiling.command.auto_pre` /
  :func:`~lanton_dist.profiling.command.auto_post`, which profile only where the command's
  report directory is set (torch itself is not imported early);
* runs the next ``sitecustomize.py`` on ``sys.path``, so an environment's own one still applies.

Imported under any other name (``lanton_dist.profiling.bootstrap``) it does nothing. It must stay
importable on its own: only the standard library at module level.
"""
import importlib.abc
import importlib.util
import os
import sys


def _pre(opt, args, kwargs):
    from lanton_dist.profiling.command import auto_pre
    auto_pre(opt)


def _post(opt, args, kwargs):
    from lanton_dist.profiling.command import auto_post
    auto_post(opt)


class LantonProfileFinder(importlib.abc.MetaPathFinder):
    """Registers global optimizer step hooks right after torch.optim.optimizer is loaded."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch.optim.optimizer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            module.register_optimizer_step_pre_hook(_pre)
            module.register_optimizer_step_post_hook(_post)

        spec.loader.exec_module = exec_module
        return spec


def _run_next_sitecustomize() -> None:
    """Execute the first other ``sitecustomize.py`` on ``sys.path`` (this one shadows it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in sys.path:
        f = os.path.join(d or ".", "sitecustomize.py")
        if os.path.abspath(d or ".") != here and os.path.isfile(f):
            with open(f) as fh:
                exec(compile(fh.read(), f, "exec"), {"__name__": "sitecustomize", "__file__": f})
            break


if __name__ == "sitecustomize":
    sys.meta_path.insert(0, LantonProfileFinder())
    _run_next_sitecustomize()
