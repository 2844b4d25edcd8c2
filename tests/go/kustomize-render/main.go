// kustomize-render renders a kustomization directory with kustomize's own
// library (what `kubectl kustomize` runs), checks every object, and prints
// the objects as YAML documents. Objects of Kubernetes' built-in kinds are
// decoded strictly against their Go types (an unknown field, a wrong type
// or a misplaced entry is an error); NSM's NetworkService is checked
// against the shape of its CRD. Exit 1 with the reason on any error.
package main

import (
	"fmt"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// The NetworkService CRD's spec (networkservicemesh.io/v1), as NSM's
// deployments-k8s defines it: unknown fields are refused.
type networkService struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   map[string]any    `json:"metadata"`
	Spec       networkServiceSpec `json:"spec"`
}

type networkServiceSpec struct {
	Payload string  `json:"payload"`
	Matches []match `json:"matches,omitempty"`
}

type match struct {
	SourceSelector map[string]string `json:"source_selector,omitempty"`
	Routes         []destination     `json:"routes,omitempty"`
	Fallthrough    bool              `json:"fallthrough,omitempty"`
	Metadata       *struct {
		Labels map[string]string `json:"labels,omitempty"`
	} `json:"metadata,omitempty"`
}

type destination struct {
	DestinationSelector map[string]string `json:"destination_selector,omitempty"`
	Weight              uint32            `json:"weight,omitempty"`
}

func check(doc []byte, kind, apiVersion string) error {
	if apiVersion == "networkservicemesh.io/v1" {
		if kind != "NetworkService" {
			return fmt.Errorf("unknown NSM kind %q", kind)
		}
		var ns networkService
		if err := yaml.UnmarshalStrict(doc, &ns); err != nil {
			return err
		}
		if ns.Spec.Payload != "IP" && ns.Spec.Payload != "ETHERNET" {
			return fmt.Errorf("spec.payload %q is not IP or ETHERNET", ns.Spec.Payload)
		}
		return nil
	}
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
	_, _, err := codecs.UniversalDeserializer().Decode(doc, nil, nil)
	return err
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: kustomize-render DIR")
		os.Exit(2)
	}
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "kustomize-render: %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	var out []string
	for _, r := range m.Resources() {
		doc, err := r.AsYAML()
		if err != nil {
			fmt.Fprintf(os.Stderr, "kustomize-render: %s: %v\n", r.CurId(), err)
			os.Exit(1)
		}
		if err := check(doc, r.GetKind(), r.GetApiVersion()); err != nil {
			fmt.Fprintf(os.Stderr, "kustomize-render: %s %s/%s: %v\n", os.Args[1], r.GetKind(), r.GetName(), err)
			os.Exit(1)
		}
		out = append(out, string(doc))
	}
	fmt.Print(strings.Join(out, "---\n"))
}
