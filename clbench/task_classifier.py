"""The task classifier of the class setting (Abati et al., CVPR 2020), shared by the
strategies whose network has one path per task (ccgn, hat_tc): all learned paths run on
the input, their features are concatenated, and an MLP picks the task whose head answers.
"""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import DataLoader, TensorDataset

from clbench.registry import Hyperparameters


class TaskClassifierHparams(Hyperparameters):
    memory_size: int = Field(500, gt=0, description="class setting: episodic memory C of the task classifier")
    classifier_epochs: int = Field(10, gt=0, description="class setting: task-classifier epochs after each task")
    classifier_lr: float = Field(1e-3, gt=0, description="class setting: task-classifier Adam learning rate")


class TaskClassifierTraining:
    """Mixin for an Avalanche template training a `TaskPathNet`: after each task, update
    the episodic memory and fit the task classifier (class setting only).

    Memory: memory_size // tasks random training examples per learned task. The
    classifier is trained on the frozen paths' features of the task's training data plus
    the memory, for classifier_epochs with Adam, with a loss weighted so that every task
    counts equally."""

    hp: TaskClassifierHparams

    def learn_task_classifier(self, task: int):
        if self.model.setting != "class":
            return
        if not hasattr(self, "memory"):
            self.memory: dict[int, torch.Tensor] = {}
        self.update_memory(task)
        self.train_task_classifier(task)

    @torch.no_grad()
    def update_memory(self, task: int):
        per_task = self.hp.memory_size // (task + 1)
        for past in self.memory:
            self.memory[past] = self.memory[past][:per_task]
        dataset = self.adapted_dataset.eval()
        chosen = torch.randperm(len(dataset))[:per_task].tolist()
        self.memory[task] = next(iter(DataLoader(dataset.subset(chosen), batch_size=len(chosen))))[0]

    def train_task_classifier(self, task: int):
        model = self.model
        model.eval()
        inputs = [(x, torch.full((len(x),), task)) for x, _, _ in
                  DataLoader(self.adapted_dataset.eval(), batch_size=self.eval_mb_size)]
        inputs += [(x, torch.full((len(x),), past)) for past, x in self.memory.items() if past != task]
        with torch.no_grad():
            features = torch.cat([torch.cat(model.path_features(x.to(self.device))[0], 1) for x, _ in inputs])
        tasks = torch.cat([t for _, t in inputs]).to(self.device)
        counts = torch.bincount(tasks, minlength=task + 1).float()
        weights = counts.sum() / (len(counts) * counts)
        optimizer = torch.optim.Adam(model.task_classifier.parameters(), lr=self.hp.classifier_lr)
        model.task_classifier.train()
        for _ in range(self.hp.classifier_epochs):
            for f, t in DataLoader(TensorDataset(features, tasks), batch_size=self.train_mb_size, shuffle=True):
                loss = F.cross_entropy(model.classify_task(f), t, weight=weights)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
