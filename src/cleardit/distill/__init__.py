"""Distillation: teacher data from the original model, then attention-only CLEAR fine-tuning."""

from .teacher_data import TeacherDataset, make_teacher_data

__all__ = ["TeacherDataset", "make_teacher_data"]
