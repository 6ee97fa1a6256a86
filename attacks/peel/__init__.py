"""PEEL: backward, block-by-block feature inversion of residual networks."""
from leakbench.attacks.peel.attack import PEEL
from leakbench.attacks.peel.chain import stage_input_errors, true_input_errors
from leakbench.attacks.peel.observation import Exact, Masked, Noisy, Quantized
from leakbench.attacks.peel.readers import read_defense, reader_for, register_reader
from leakbench.attacks.peel.solver import invert_block, invert_stage
from leakbench.attacks.peel.stages import Stage, UnsupportedLayerError, extract_stages, fold_conv_bn

__all__ = ["PEEL", "Exact", "Masked", "Noisy", "Quantized", "read_defense", "reader_for", "register_reader",
           "invert_block", "invert_stage", "Stage", "UnsupportedLayerError", "extract_stages",
           "fold_conv_bn", "stage_input_errors", "true_input_errors"]
