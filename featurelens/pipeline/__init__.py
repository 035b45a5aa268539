"""Jobs that chain the parts together: `run_demo`, from nothing to a fully analysed, browsable model."""

from .demo import DEMO_STEPS, DemoBudget, DemoReport, demo_state, run_demo

__all__ = ["DEMO_STEPS", "DemoBudget", "DemoReport", "demo_state", "run_demo"]
