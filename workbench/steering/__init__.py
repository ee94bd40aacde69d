"""Weighted Activation Steering (Guiding Giants, arXiv 2505.20309): controller, steered generation,
training objectives, baselines and evaluation."""

from .controller import Controller, ControllerConfig, load_controller, save_controller
from .hooks import steering_hooks
from .steer import SteeringPlan, controller_inputs, generate_steered

__all__ = [
    "Controller", "ControllerConfig", "SteeringPlan", "controller_inputs",
    "generate_steered", "load_controller", "save_controller", "steering_hooks",
]
