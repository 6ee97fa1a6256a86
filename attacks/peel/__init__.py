"""PEEL: backward, block-by-block feature inversion of residual networks."""
from attacks.peel.attack import PEEL
from attacks.peel.chain import stage_input_errors, true_input_errors
from attacks.peel.solver import invert_block, invert_stage
from attacks.peel.stages import Stage, UnsupportedLayerError, extract_stages, fold_conv_bn

__all__ = ["PEEL", "invert_block", "invert_stage", "Stage", "UnsupportedLayerError", "extract_stages",
           "fold_conv_bn", "stage_input_errors", "true_input_errors"]
